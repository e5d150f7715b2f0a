"""The prefetch queue (order, measured wait, errors at the step that needs the item) and the indexed
blend's input checks (weights, prefixes, empty splits, config keys) -- fast, no ranks."""
import json
import time

import pytest

from megatron_tanuki.data.prefetch import Prefetcher


def test_prefetcher_keeps_order_and_builds_ahead_of_the_consumer():
    built = []

    def items():
        for i in range(6):
            built.append(i)
            yield i

    p = Prefetcher(items(), depth=2)
    _until(lambda: len(built) >= 3)
    time.sleep(0.1)
    assert built == [0, 1, 2]  # two queued + one waiting for room, before anyone asked; no further
    got = [p.next() for _ in range(6)]
    assert got == list(range(6))
    with pytest.raises(StopIteration):
        p.next()
    p.close()


def test_prefetcher_measures_the_wait_and_depth_zero_is_synchronous():
    def slow():
        for i in range(3):
            time.sleep(0.2)
            yield i

    p = Prefetcher(slow(), depth=2)
    assert p.next() == 0  # nothing was ready: the step waited for the first item
    assert p.take_wait() >= 0.15
    _until(lambda: p._queue.qsize() == 2)  # meanwhile the next items were built
    assert [p.next(), p.next()] == [1, 2] and p.take_wait() < 0.1
    p.close()
    sync = Prefetcher(iter([7, 8]), depth=0)
    assert (sync.next(), sync.next()) == (7, 8) and sync._thread is None


def test_a_producer_error_is_raised_at_the_step_that_needed_the_item():
    def failing():
        yield 1
        raise ValueError("data.json[3]: corrupt")

    p = Prefetcher(failing(), depth=2)
    assert p.next() == 1
    with pytest.raises(ValueError, match=r"data.json\[3\]: corrupt"):
        p.next()
    with pytest.raises(ValueError, match="corrupt"):  # asked again: the same error, not a hang
        p.next()
    p.close()


def test_close_stops_a_producer_blocked_on_a_full_queue():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    p = Prefetcher(endless(), depth=1)
    p.next()
    _until(lambda: p._queue.full())
    p.close()
    assert not p._thread.is_alive()


def _until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _indexed(tmp_path, name, docs):
    """A real megatron-core indexed dataset of ``docs`` documents (via tanuki preprocess-data's code)."""
    from megatron_tanuki.data.indexed import preprocess

    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": f"文書{i}です。"}, ensure_ascii=False) + "\n" for i in range(docs)),
                   encoding="utf-8")
    preprocess([str(src)], str(tmp_path / name), workers=1, progress=False, log=lambda *a: None)
    return str(tmp_path / name)


def test_blend_forms_and_prefix_resolution(tmp_path):
    from megatron_tanuki.data.blend import BlendError, parse_blend

    a, b = _indexed(tmp_path, "a", 4), _indexed(tmp_path, "b", 4)
    assert parse_blend([0.7, a, 0.3, b], "data.blend") == ([a + "_text_document", b + "_text_document"], [0.7, 0.3])
    assert parse_blend([a + "_text_document"], "data.blend") == ([a + "_text_document"], None)
    with pytest.raises(BlendError, match=r"data.blend: a weighted blend is \[weight, prefix"):
        parse_blend([0.7, a, b], "data.blend")
    with pytest.raises(BlendError, match="data.valid: weights must be positive"):
        parse_blend([0, a], "data.valid")
    with pytest.raises(BlendError, match=r"data.blend: no indexed dataset at '.*/missing'.*missing_text_document"):
        parse_blend([str(tmp_path / "missing")], "data.blend")


def test_an_empty_split_is_refused_by_name_instead_of_hanging(tmp_path):
    from megatron_tanuki.data import blend
    from megatron_tanuki.data.tokenizer import load_tokenizer

    small = _indexed(tmp_path, "small", 10)
    parsed = blend.parse_blend([small], "data.blend")
    cfg = blend.gpt_config(load_tokenizer(), 1234, 16, parsed, None, "969,30,1", str(tmp_path / "cache"))
    assert cfg.split_matrix[2] is None  # the test split is never built
    with pytest.raises(blend.BlendError, match=r"small_text_document has 10 documents; its valid share of "
                                               r"data.split '969,30,1' holds none"):
        blend.check_splits(cfg)
    ok = blend.gpt_config(load_tokenizer(), 1234, 16, parsed, None, "80,20,0", str(tmp_path / "cache"))
    train, valid, test = blend.build(ok, blend.sizes(2, 4, 1, None))
    assert len(train) >= 8 and len(valid) >= 4 and test is None


def test_indexed_config_keys_are_checked(tmp_path):
    from megatron_tanuki.train.config import ConfigError, load

    base = ["model.preset=tanuki-8x8b-tiny", "train.mode=pretrain", "data.format=indexed"]
    with pytest.raises(ConfigError, match="data.format indexed needs data.blend"):
        load(None, [*base, "train.train_steps=3"])
    with pytest.raises(ConfigError, match="needs train.train_steps"):
        load(None, [*base, "data.blend=[x]", "train.epochs=1"])
    with pytest.raises(ConfigError, match="data.format indexed is for train.mode pretrain"):
        load(None, ["model.preset=tanuki-8x8b-tiny", "train.mode=sft", "data.format=indexed", "data.blend=[x]",
                    "train.train_steps=3"])
    with pytest.raises(ConfigError, match="train.eval_interval must be a positive"):
        load(None, [*base, "data.blend=[x]", "train.train_steps=3", "train.eval_interval=0"])
    cfg = load(None, [*base, "data.blend=[0.5, x, 0.5, y]", "train.train_steps=3"])
    assert cfg.train.overlap_grad_reduce and cfg.train.overlap_param_gather and cfg.data.split == "969,30,1"
