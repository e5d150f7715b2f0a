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


def _rank_sees():
    import multiprocessing
    import os
    import sys

    import torch.distributed as dist

    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    both = [None, None]
    dist.all_gather_object(both, os.environ["RANK"])  # the rendezvous at the parent's store worked
    return (os.environ.get("TANUKI_PROBE"), os.getcwd(), both, "megatron.core.models.gpt" in sys.modules,
            multiprocessing.parent_process() is not None)


def test_ranks_fork_from_the_preloaded_server_with_the_callers_environment(tmp_path, monkeypatch):
    """The fork server starts once with the environment of its start; a rank must still see the
    caller's environment and working directory *now*, and meet its peers at the parent's store."""
    run_ranks(_rank_identity, 2)  # the fork server is running after this
    monkeypatch.setenv("TANUKI_PROBE", "set after the fork server started")
    monkeypatch.chdir(tmp_path)
    results = run_ranks(_rank_sees, 2)
    assert results == [("set after the fork server started", str(tmp_path), ["0", "1"], True, True)] * 2


def test_the_fork_server_preloads_no_cuda_user_on_a_gpu_machine():
    from megatron_tanuki.runtime.spawn import preload_modules

    assert preload_modules(["/dev/nvidia0"]) == ["megatron_tanuki", "torch", "torch.distributed"]
    assert "megatron.core.models.gpt" in preload_modules([])


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
