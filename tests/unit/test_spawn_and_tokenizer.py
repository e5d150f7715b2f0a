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


def _meet_at_the_parents_store():
    import torch.distributed as dist

    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    ranks = [None, None]
    dist.all_gather_object(ranks, dist.get_rank())
    return ranks


def test_ranks_rendezvous_at_a_store_the_parent_holds():
    """run_ranks binds the rendezvous store itself (kernel-chosen port) before the ranks start: a
    port probed free and bound later by rank 0 was taken meanwhile once (EADDRINUSE in CI)."""
    assert run_ranks(_meet_at_the_parents_store, 2) == [[0, 1], [0, 1]]


def test_a_synchronous_checkpoint_save_starts_no_process(tmp_path):
    """megatron-core's writer would start a Manager server process (spawn, ~3 s) on a process's
    first save; ours collects in this process. The checkpoint still loads back equal."""
    assert run_ranks(_save_and_count_children, 1, str(tmp_path / "ck")) == [([], True)]


def _save_and_count_children(path):
    import os

    import psutil
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed
    from megatron_tanuki.train.checkpoint import save_sharded

    init_distributed(ParallelLayout())
    w = torch.arange(12.0).reshape(3, 4)
    os.makedirs(path)
    save_sharded({"w": ShardedTensor.from_rank_offsets("w", w)}, path)
    children = [p.name() for p in psutil.Process().children(recursive=True)]
    back = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(3, 4))}, path)
    return children, bool(torch.equal(back["w"], w))


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
