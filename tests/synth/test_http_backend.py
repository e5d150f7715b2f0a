"""OpenAIBackend against the fake OpenAI-compatible server on loopback.

Every request completes exactly once with its own answer through 429s with Retry-After, 500s, dropped
connections, broken bodies and varying latency; retries are counted by kind exactly as the server
injected them; Retry-After is a measured lower bound on the wait; a 400 is not retried; several base
URLs share the load; the concurrency limit halves on a 429 burst, grows back while healthy and shrinks
10% when latency per token rises; the API key travels as a Bearer header; close() is prompt.
"""
import email.utils
import time

import pytest

from megatron_tanuki.synth.backend import TurnRequest
from megatron_tanuki.synth.http_backend import OpenAIBackend, parse_retry_after, with_images
from megatron_tanuki.synth.fake_server import FakeServer, answer_for, prompt_tokens_for, request_digest

FAST = dict(backoff_s=0.02, backoff_max_s=0.2)


def make_requests(n: int, tag: str = "c") -> list[TurnRequest]:
    return [TurnRequest(key=f"{tag}{i:04d}:q1:0", seed=1000 + 7919 * i, max_tokens=64, stop=("</s>",),
                        messages=[{"role": "system", "content": "あなたは親切なアシスタントです。"},
                                  {"role": "user", "content": f"問題 {tag}{i}: 整数を一つ選んでください。"}])
            for i in range(n)]


def drive(backend, requests, deadline_s: float = 30.0) -> dict:
    """The scheduler's loop: submit up to capacity(), poll; every result by key (each exactly once)."""
    pending, results = list(requests), {}
    deadline = time.monotonic() + deadline_s
    while len(results) < len(requests):
        while pending and backend.capacity() > 0:
            backend.submit(pending.pop(0))
        for r in backend.poll(0.05):
            assert r.key not in results, f"{r.key} came back twice"
            results[r.key] = r
        assert time.monotonic() < deadline, f"{len(results)}/{len(requests)} done after {deadline_s} s"
    return results


def assert_answered(requests, results):
    assert sorted(results) == sorted(r.key for r in requests)
    for req in requests:
        res = results[req.key]
        assert (res.finish_reason, res.error, res.error_kind) == ("stop", None, None), res
        assert res.text == answer_for(req.messages, req.seed)
        assert (res.prompt_tokens, res.completion_tokens) == (prompt_tokens_for(req.messages), 8)


def test_faults_retried_by_kind_and_retry_after_honoured():
    # 10 each of 429 (Retry-After: 1), 500, dropped connection, truncated body among the first 100 arrivals
    script = {0: "429", 1: "500", 2: "drop", 3: "garbage"}
    requests = make_requests(200)
    with FakeServer(latency=lambda n, body: 0.005 + (body["seed"] % 7) * 0.005,
                    faults=lambda n, body: script.get(n % 10) if n < 100 else None, retry_after=1) as srv:
        backend = OpenAIBackend([srv.url], concurrency=32, max_concurrency=32, **FAST)
        try:
            results = drive(backend, requests)
            stats = backend.stats()
        finally:
            backend.close()
    assert_answered(requests, results)
    assert (srv.sent_429, srv.sent_500, srv.drops, srv.sent["garbage"]) == (10, 10, 10, 10)
    assert stats.retries == {"http_429": 10, "http_500": 10, "connection": 10, "bad_response": 10}
    assert stats.errors == {}
    assert sum(r.retries for r in results.values()) == 40
    assert srv.requests == 240 and srv.ok == 200
    assert srv.model_requests == 1 and {h.model for h in srv.log} == {"fake-teacher"}
    assert srv.max_concurrency <= 32  # attempts beyond the limit wait in the backend
    waits = []
    for hit in srv.log:
        if hit.fault == "429":
            later = [h for h in srv.hits(hit.digest) if h.n > hit.n]
            waits.append(later[0].t - hit.t)
    assert len(waits) == 10 and min(waits) >= 1.0, waits


def test_400_is_not_retried_and_names_the_url():
    req = make_requests(1)
    with FakeServer(faults={0: "400"}) as srv:
        with OpenAIBackend([srv.url], **FAST) as backend:
            results = drive(backend, req)
            stats = backend.stats()
    res = results[req[0].key]
    assert (res.finish_reason, res.error_kind, res.retries, res.text) == ("error", "http_400", 0, "")
    assert f"{srv.url}/chat/completions" in res.error and "fake: injected bad request" in res.error
    assert srv.requests == 1
    assert (stats.retries, stats.errors) == ({}, {"http_400": 1})


def test_gives_up_after_max_retries_with_the_last_kind():
    req = make_requests(1)
    with FakeServer(faults=lambda n, body: "500" if n < 3 else "503", retry_after=None) as srv:
        with OpenAIBackend([srv.url], max_retries=4, **FAST) as backend:
            res = drive(backend, req)[req[0].key]
            stats = backend.stats()
    assert (res.finish_reason, res.error_kind, res.retries) == ("error", "http_503", 4)
    assert "fake: injected 503" in res.error
    assert srv.requests == 5
    assert (stats.retries, stats.errors) == ({"http_500": 3, "http_503": 1}, {"http_503": 1})


def test_read_timeout_is_retried():
    req = make_requests(1)
    with FakeServer(latency=lambda n, body: 2.0 if n == 0 else 0.0) as srv:
        with OpenAIBackend([srv.url], timeout_s=0.3, **FAST) as backend:
            res = drive(backend, req)[req[0].key]
            stats = backend.stats()
    assert (res.finish_reason, res.retries, res.text) == ("stop", 1, answer_for(req[0].messages, req[0].seed))
    assert stats.retries == {"timeout": 1} and srv.requests == 2


def test_retry_after_http_date():
    req = make_requests(1)
    with FakeServer(faults={0: "429"},
                    retry_after=lambda n: email.utils.formatdate(time.time() + 2, usegmt=True)) as srv:
        with OpenAIBackend([srv.url], **FAST) as backend:
            res = drive(backend, req)[req[0].key]
    first, second = srv.hits(request_digest(req[0].messages, req[0].seed))
    assert res.finish_reason == "stop" and res.retries == 1
    assert second.t - first.t >= 1.0  # the date is now + 2 s, to the second
    assert parse_retry_after("3") == 3.0 and parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_two_base_urls_share_the_load_and_a_dead_one_fails_over():
    requests = make_requests(60)
    with FakeServer(latency=0.02) as a, FakeServer(latency=0.02) as b:
        with OpenAIBackend([a.url, b.url], concurrency=8, **FAST) as backend:
            results = drive(backend, requests)
        assert_answered(requests, results)
        assert a.requests + b.requests == 60 and min(a.requests, b.requests) >= 20, (a.requests, b.requests)

        import socket
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        more = make_requests(20, tag="d")
        with OpenAIBackend([dead, b.url], model="fake-teacher", concurrency=4, **FAST) as backend:
            results = drive(backend, more)
            stats = backend.stats()
        assert_answered(more, results)
        assert stats.retries.get("connection", 0) >= 1 and set(stats.retries) == {"connection"}
        assert stats.errors == {}


def test_concurrency_halves_on_429_burst_then_grows_back():
    burst, healthy = make_requests(16, tag="b"), make_requests(120, tag="h")
    with FakeServer(latency=0.05, faults=lambda n, body: "429" if n < 16 else None, retry_after=0) as srv:
        with OpenAIBackend([srv.url], concurrency=16, max_concurrency=64, **FAST) as backend:
            assert backend.stats().concurrency == 16 and backend.capacity() == 16
            drive(backend, burst)
            after_burst = backend.stats()
            results = drive(backend, healthy)
            after_healthy = backend.stats()
    assert after_burst.retries == {"http_429": 16} and srv.sent_429 == 16
    # one halving for the whole burst (at most one per second): 16 -> 8, then +1 after 8 successes
    assert after_burst.concurrency in (8, 9), after_burst.concurrency
    assert_answered(healthy, results)
    # +1 after every `limit` successes: 9 + 10 + ... + 16 = 100 successes reach 17, 117 reach 18
    print(f"concurrency: 16 -> {after_burst.concurrency} after the 429 burst -> {after_healthy.concurrency}")
    assert after_healthy.concurrency >= after_burst.concurrency + 3


def test_concurrency_shrinks_when_latency_per_token_rises():
    # the same 0.1 s per request, but 8 output tokens for the first 48 and 1 after: 8x the latency per token
    requests = make_requests(72)
    with FakeServer(latency=0.1, completion_tokens=lambda n, body: 8 if n < 48 else 1) as srv:
        with OpenAIBackend([srv.url], concurrency=10, max_concurrency=10, **FAST) as backend:
            results = drive(backend, requests)
            stats = backend.stats()
    assert sorted(r.completion_tokens for r in results.values()) == [1] * 24 + [8] * 48
    # once 17 of the last 32 successes are slow: 10 -> 9 (-10%); no second shrink before 32 more
    # successes, and no growth while the latency stays high
    assert stats.concurrency == 9 and stats.retries == {} and srv.ok == 72


def test_api_key_is_a_bearer_header():
    requests = make_requests(5)
    with FakeServer(api_key="sk-fake-123") as srv:
        with OpenAIBackend([srv.url], model="fake-teacher", api_key="sk-fake-123", **FAST) as backend:
            assert_answered(requests, drive(backend, requests))
        assert {h.auth for h in srv.log} == {"Bearer sk-fake-123"} and srv.model_requests == 0
        with OpenAIBackend([srv.url], **FAST) as backend:  # no key: 401 from /models, not retried
            res = drive(backend, requests[:1])[requests[0].key]
        assert (res.error_kind, res.retries) == ("http_401", 0)
        assert f"{srv.url}/models" in res.error and "wrong API key" in res.error


def test_close_with_requests_in_flight_is_prompt():
    with FakeServer(latency=20.0) as srv:
        backend = OpenAIBackend([srv.url], **FAST)
        for req in make_requests(8):
            backend.submit(req)
        deadline = time.monotonic() + 10
        while srv.requests < 8:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert backend.in_flight() == 8 and backend.capacity() == 24
        start = time.monotonic()
        backend.close()
        took = time.monotonic() - start
        backend.close()  # idempotent
        assert took < 2.0, took
        assert backend.in_flight() == 0 and backend.capacity() == 0 and backend.poll(0.1) == []
        with pytest.raises(RuntimeError, match="after close"):
            backend.submit(make_requests(1)[0])


def test_images_go_as_data_url_parts(tmp_path):
    png = tmp_path / "cat.png"
    png.write_bytes(b"\x89PNG fake bytes")
    plain = TurnRequest(key="img:0", seed=5, images=(str(png),),
                        messages=[{"role": "system", "content": "説明して"}, {"role": "user", "content": "この画像は？"}])
    marked = TurnRequest(key="img:1", seed=6, images=(str(png), str(png)),
                         messages=[{"role": "user", "content": "<image>\n一枚目と<image>二枚目の違いは？"}])
    wrong = TurnRequest(key="img:2", seed=7, images=(str(png),), messages=[{"role": "user", "content": "<image><image>"}])
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORyBmYWtlIGJ5dGVz"}}
    assert with_images(plain)[1]["content"] == [image, {"type": "text", "text": "この画像は？"}]
    assert with_images(marked)[0]["content"] == [image, {"type": "text", "text": "一枚目と"}, image,
                                                 {"type": "text", "text": "二枚目の違いは？"}]
    with FakeServer() as srv:
        with OpenAIBackend([srv.url], **FAST) as backend:
            results = drive(backend, [plain, marked, wrong])
    for req in (plain, marked):
        assert results[req.key].text == answer_for(with_images(req), req.seed)
    assert results["img:2"].error_kind == "request" and "2 <image> marks" in results["img:2"].error
    assert srv.requests == 2


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'node1:8000/v1'"):
        OpenAIBackend(["http://ok:8000/v1", "node1:8000/v1"])
    with pytest.raises(ValueError, match="no base URL"):
        OpenAIBackend([])
    with pytest.raises(ValueError, match="min_concurrency <= concurrency"):
        OpenAIBackend(["http://ok:8000/v1"], concurrency=0)
