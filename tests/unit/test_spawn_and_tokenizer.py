import pytest

from megatron_tanuki.data.tokenizer import PADDED_VOCAB, TanukiTokenizer
from megatron_tanuki.runtime.spawn import RankFailed, run_ranks


def _rank_identity():
    import os
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _fails_on_rank_1():
    import os
    if os.environ["RANK"] == "1":
        raise ValueError("bad shard on rank 1")
    return "fine"


def test_run_ranks_returns_results_by_rank():
    assert run_ranks(_rank_identity, 2) == [(0, 2), (1, 2)]


def test_run_ranks_reports_the_failing_rank():
    with pytest.raises(RankFailed) as e:
        run_ranks(_fails_on_rank_1, 2)
    assert "--- rank 1 ---" in str(e.value) and "ValueError: bad shard on rank 1" in str(e.value)


def test_real_tanuki_tokenizer():
    tok = TanukiTokenizer()
    assert tok.vocab_size == 65000 and PADDED_VOCAB == 65024
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    text = "赤い円が左上にあります。"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == [13414, 282, 483, 275, 1425, 427, 274, 1040, 270]
    assert tok.decode(ids) == text


def test_missing_tokenizer_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found: .*nope.model"):
        TanukiTokenizer(str(tmp_path / "nope.model"))
