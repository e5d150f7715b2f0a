"""The OpenAI-compatible app (serve/app.py) on a real engine loop, over real HTTP.

A tiny Tanuki (random init, fp32, built in-process), the real Tanuki tokenizer, an Engine and an
EngineLoop stepping in a background thread, the app under uvicorn on 127.0.0.1 (a free port) and
httpx as the client. Token values of a random model mean nothing, so the tests compare answers with
each other (stream vs not, alone vs concurrent, the same seed twice) and with jobs submitted to the
loop directly; statuses and error types are checked exactly.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

KEY = "sk-test-key"
MODEL = "tanuki-test"
ENGINE = dict(max_sequence_length=512, kv_memory_gb=0.02, block_size=64, max_tokens=256)
LIMITS = dict(max_body_bytes=16384, max_prompt_tokens=200, max_tokens_limit=400, max_concurrency=4)
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
Q = [{"role": "user", "content": "日本の首都はどこですか？"}]


@pytest.fixture(scope="module")
def stack(single_process):
    """(cfg, tok, engine, loop): the loop's serve_forever runs in a thread until the module ends."""
    from megatron.core.inference.utils import InferenceMode

    from megatron_tanuki.data.tokenizer import TanukiTokenizer
    from megatron_tanuki.inference.engine import Engine, EngineOptions
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.runtime.distributed import ParallelLayout, set_seeds
    from megatron_tanuki.serve.loop import EngineLoop

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads on a shared 2-core machine
    set_seeds(7)
    cfg = registry.get_preset("tanuki-8b-tiny")
    chunks = registry.build(cfg, ParallelLayout(), BuildOptions(dtype="fp32"))
    tok = TanukiTokenizer()
    engine = Engine(chunks, tok, EngineOptions(**ENGINE), vocab_limit=tok.vocab_size, log=lambda *_: None)
    loop = EngineLoop(engine, tok, leader=True)
    thread = threading.Thread(target=loop.serve_forever, daemon=True)
    thread.start()
    yield cfg, tok, engine, loop
    loop.shutdown(0.0)
    thread.join(30)
    InferenceMode.unset_active()
    torch.set_num_threads(threads)


def _opts(**kw):
    from megatron_tanuki.serve.options import ServeOptions

    return ServeOptions(**{"served_model_name": MODEL, "max_seq_len": 512, **kw})


class _Uvicorn:
    """The app on 127.0.0.1 at a free port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def http(stack):
    """(httpx client with the key, the app) for an app with a key and small limits."""
    from megatron_tanuki.serve.app import create_app

    cfg, tok, _, loop = stack
    app = create_app(loop, tok, cfg, _opts(api_key=KEY, **LIMITS))
    srv = _Uvicorn(app)
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client, app
    srv.stop()


def _sse(response) -> list:
    """The events of an SSE body: chunk dicts, then "[DONE]"."""
    out = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return out


def _stream(client, path, body) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return _sse(r)


def _error(r, status, type_="invalid_request_error", param=None, code=None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == (type_, param, code), err
    return err["message"]


def _idle(engine, loop, timeout=20.0):
    deadline = time.monotonic() + timeout
    while engine.in_flight or loop.stats["in_flight"] or engine.kv_usage() > 0 or loop.stats["kv_usage"] > 0:
        assert time.monotonic() < deadline, (engine.in_flight, loop.stats, engine.kv_usage())
        time.sleep(0.05)


# ----------------------------------------------------------------------------- auth

def test_api_key_required_everywhere_but_health(http):
    client, _ = http
    bare = httpx.Client(base_url=str(client.base_url), timeout=30)
    with bare:
        assert bare.get("/health").json() == {"status": "ok"}
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", CHAT), ("POST", COMPLETIONS)):
            msg = _error(bare.request(method, path, json={}), 401, code="invalid_api_key")
            assert msg == "Missing API key: send the header 'Authorization: Bearer KEY'."
        for header in (f"Bearer {KEY}x", f"Basic {KEY}", "Bearer", f"Bearer {KEY[:-1]}"):
            r = bare.get("/v1/models", headers={"Authorization": header})
            assert _error(r, 401, code="invalid_api_key") == "Incorrect API key provided."
        r = bare.get("/v1/models", headers={"Authorization": f"bearer {KEY}"})  # the scheme is case-insensitive
        assert r.status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["object"] == "model" and models["data"][0]["max_model_len"] == 512
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    _error(client.get("/v1/models/other"), 404, param="model", code="model_not_found")


# ----------------------------------------------------------------------------- limits

def test_limits_and_malformed_bodies(http, stack):
    client, _ = http
    ok = {"model": MODEL, "messages": Q, "max_tokens": 4, "temperature": 0}
    _error(client.post(CHAT, content=b"{" + b" " * 20000 + b"}"), 413, code="request_too_large")
    msg = _error(client.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"}), 400)
    assert msg.startswith("the request body is not valid JSON: ")
    assert _error(client.post(CHAT, json=[1]), 400).startswith("the request body must be a JSON object")
    assert _error(client.post(CHAT, json={**ok, "temperature": "hot"}), 400, param="temperature") == \
        "temperature: Input should be a valid number"
    assert _error(client.post(CHAT, json={**ok, "max_tokens": 2.5}), 400, param="max_tokens") == \
        "max_tokens: Input should be a valid integer"
    _error(client.post(CHAT, json={"model": MODEL}), 400, param="messages")
    _error(client.post(CHAT, json={**ok, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}), 400,
           param="messages[0].content[0]")
    assert _error(client.post(CHAT, json={**ok, "model": "gpt-4o"}), 404, param="model", code="model_not_found") == \
        f"The model `gpt-4o` does not exist; this server serves `{MODEL}`."
    long = [{"role": "user", "content": "東京 " * 300}]
    assert "this server takes at most 200" in _error(client.post(CHAT, json={**ok, "messages": long}), 400,
                                                      param="messages")
    assert _error(client.post(CHAT, json={**ok, "max_tokens": 401}), 400, param="max_tokens") == \
        "max_tokens: 401 is over this server's limit of 400"
    assert _error(client.post(CHAT, json={**ok, "max_completion_tokens": 401}), 400,
                  param="max_completion_tokens") == "max_completion_tokens: 401 is over this server's limit of 400"
    _error(client.post(CHAT, json={**ok, "max_tokens": 0}), 400, param="max_tokens")
    _error(client.post(CHAT, json={**ok, "n": 0}), 400, param="n")
    _error(client.post(CHAT, json={**ok, "top_p": 0}), 400, param="top_p")
    _error(client.post(CHAT, json={**ok, "stop": ["", "x"]}), 400, param="stop")
    _error(client.post(CHAT, json={**ok, "top_logprobs": 2}), 400, param="top_logprobs")
    _error(client.post(CHAT, json={**ok, "presence_penalty": 0.5}), 400, param="presence_penalty")
    assert _error(client.post(CHAT, json={**ok, "messages": [{"role": "assistant", "content": "x"}]}), 400,
                  param="messages") == "messages: turn 0 should be from user, got assistant"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert _error(client.post(CHAT, json={**ok, "messages": [{"role": "user", "content": [image]}]}), 400,
                  param="messages[0].content[0].image_url") == \
        f"messages[0].content[0].image_url: {MODEL} has no vision tower; send text only"
    _error(client.post(COMPLETIONS, json={"prompt": ["a", "b"]}), 400, param="prompt")
    _error(client.post(COMPLETIONS, json={"prompt": [1, 70000]}), 400, param="prompt")
    _error(client.post(COMPLETIONS, json={"prompt": "x", "echo": True}), 400, param="echo")
    # unknown fields and `user` are ignored
    r = client.post(CHAT, json={**ok, "user": "u1", "metadata": {"a": 1}, "x_vendor": [1, 2]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4

    cfg, tok, engine, loop = stack
    loop.stopping.set()
    try:
        _error(client.post(CHAT, json=ok), 503, type_="server_error", code="shutting_down")
        assert client.get("/health").status_code == 503
    finally:
        loop.stopping.clear()


def test_prompt_plus_max_tokens_over_the_context(stack):
    """An app without a key or limits (ASGI in-process): the context bounds prompt + max_tokens."""
    from megatron_tanuki.serve.app import create_app

    cfg, tok, _, loop = stack
    app = create_app(loop, tok, cfg, _opts())
    prompt = [tok.bos_id] + [100] * 499

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return (await c.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 20}),
                    await c.post(COMPLETIONS, json={"prompt": prompt + [100] * 12, "max_tokens": 1}),
                    await c.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 12, "temperature": 0}))

    over, too_long, fits = asyncio.run(go())
    assert _error(over, 400, param="max_tokens") == ("max_tokens: this model's context holds 512 tokens; the request "
                                                     "asks for 520 (500 in the prompt, 20 to generate)")
    assert _error(too_long, 400, param="prompt") == \
        "prompt: the prompt has 512 tokens; this server takes at most 511 (context 512)"
    assert fits.status_code == 200 and fits.json()["usage"] == {"prompt_tokens": 500, "completion_tokens": 12,
                                                               "total_tokens": 512}


# ----------------------------------------------------------------------------- answers

def test_chat_greedy_matches_loop_and_stream(http, stack):
    """Non-stream text == the concatenated stream == a job submitted to the loop with the template's ids."""
    from megatron_tanuki.data import templates
    from megatron_tanuki.inference.engine import SamplingOptions
    from megatron_tanuki.serve.loop import Job

    client, _ = http
    cfg, tok, engine, loop = stack
    body = {"model": MODEL, "messages": Q, "max_tokens": 12, "temperature": 0}
    r = client.post(CHAT, json=body)
    assert r.status_code == 200
    full = r.json()
    assert full["id"].startswith("chatcmpl-") and full["object"] == "chat.completion" and full["model"] == MODEL
    assert isinstance(full["created"], int)
    (choice,) = full["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant" and choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    ids = templates.prompt_ids(tok, "tanuki", [("user", Q[0]["content"])])
    assert full["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}

    got = threading.Event()
    box = []
    loop.submit(Job("direct", ids, SamplingOptions(max_tokens=12, temperature=0),
                    sink=lambda e: (box.append(e), got.set())))
    assert got.wait(30)
    assert box[0].kind == "done" and choice["message"]["content"] == box[0].text

    events = _stream(client, CHAT, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" in c for c in chunks) and all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "length"
    middle = [c["choices"][0] for c in chunks[1:-2]]
    assert all(set(c["delta"]) == {"content"} and c["finish_reason"] is None for c in middle)
    assert "".join(c["delta"]["content"] for c in middle) == choice["message"]["content"]

    plain = _stream(client, CHAT, body)  # without include_usage there is no usage key at all
    assert all("usage" not in c for c in plain[:-1])


def test_n_choices_and_seeded_sampling_reproducible(http):
    client, _ = http
    body = {"model": MODEL, "messages": Q, "max_tokens": 10, "temperature": 1.0, "top_k": 50, "seed": 1234, "n": 2}
    first = client.post(CHAT, json=body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1]
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts[0] != texts[1]  # each choice has its own key
    assert first["usage"]["completion_tokens"] == 20

    others = [{**body, "seed": s, "n": 1} for s in (1, 2, 3)]
    with ThreadPoolExecutor(4) as pool:  # the same request among others (another batch composition)
        futures = [pool.submit(client.post, CHAT, json=b) for b in [body, *others]]
        again = futures[0].result().json()
        assert all(f.result().status_code == 200 for f in futures)
    assert [c["message"]["content"] for c in again["choices"]] == texts
    streamed = _stream(client, CHAT, body)[:-1]
    by_choice = {0: "", 1: ""}
    for c in streamed:
        for ch in c["choices"]:
            by_choice[ch["index"]] += ch["delta"].get("content") or ""
    assert [by_choice[0], by_choice[1]] == texts
    other_seed = client.post(CHAT, json={**body, "seed": 99}).json()
    assert [c["message"]["content"] for c in other_seed["choices"]] != texts


def test_stop_strings(http):
    client, _ = http
    body = {"model": MODEL, "messages": Q, "max_tokens": 16, "temperature": 0}
    text = client.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    want = text[:text.find(stop)]
    r = client.post(CHAT, json={**body, "stop": stop}).json()
    assert r["choices"][0]["message"]["content"] == want and r["choices"][0]["finish_reason"] == "stop"
    chunks = _stream(client, CHAT, {**body, "stop": ["zzzz", stop]})[:-1]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completions_text_ids_logprobs_and_stream(http, stack):
    from megatron_tanuki.data import templates

    client, _ = http
    cfg, tok, engine, loop = stack
    prompt = "むかしむかし、あるところに"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2}
    r = client.post(COMPLETIONS, json=body).json()
    assert r["id"].startswith("cmpl-") and r["object"] == "text_completion"
    (choice,) = r["choices"]
    ids = templates.encode_text(tok, prompt, images=False)[0]
    assert ids[0] == tok.bos_id and r["usage"]["prompt_tokens"] == len(ids)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(8)]
    assert all(1 <= len(t) <= 2 for t in lp["top_logprobs"])
    # the same prompt as token ids (taken as is), and as a list of one
    for p in (ids, [ids], [prompt]):
        same = client.post(COMPLETIONS, json={**body, "prompt": p, "logprobs": None}).json()
        assert same["choices"][0]["text"] == choice["text"] and same["choices"][0]["logprobs"] is None
    chunks = _stream(client, COMPLETIONS, body)[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]] == \
        lp["tokens"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs_shape(http):
    client, _ = http
    r = client.post(CHAT, json={"model": MODEL, "messages": Q, "max_tokens": 6, "temperature": 0.7, "seed": 3,
                                "logprobs": True, "top_logprobs": 3}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 6 and "".join(e["token"] for e in content) == r["choices"][0]["message"]["content"]
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"} and e["bytes"] == list(e["token"].encode())
        assert e["logprob"] <= 0 and 1 <= len(e["top_logprobs"]) <= 3
        values = [t["logprob"] for t in e["top_logprobs"]]
        assert values == sorted(values, reverse=True)

    # streamed, every token's top_logprobs arrive in the chunk that carries it, equal to the whole answer's
    chunks = _stream(client, CHAT, {"model": MODEL, "messages": Q, "max_tokens": 6, "temperature": 0.7, "seed": 3,
                                    "logprobs": True, "top_logprobs": 3, "stream": True})
    streamed = [e for c in chunks if isinstance(c, dict) for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert [e["top_logprobs"] for e in streamed] == [e["top_logprobs"] for e in content]


# ----------------------------------------------------------------------------- disconnects, 429, metrics

def test_concurrency_limit_and_disconnects_free_kv(http, stack):
    client, _ = http
    cfg, tok, engine, loop = stack
    _idle(engine, loop)
    body = {"model": MODEL, "messages": Q, "max_tokens": 400, "temperature": 0, "stream": True}  # ~4 s each
    opened = []
    try:
        for _ in range(LIMITS["max_concurrency"]):
            r = client.send(client.build_request("POST", CHAT, json=body), stream=True)
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the stream is open and generating
            opened.append((r, lines))  # a dropped line iterator would close its response
        assert engine.kv_usage() > 0 and http[1].state.tanuki.active == 4
        busy = client.post(CHAT, json={**body, "stream": False})
        _error(busy, 429, type_="rate_limit_error", code="rate_limit_exceeded")
        assert busy.headers["retry-after"] == "1"
    finally:
        steps = engine.steps
        for r, _ in opened:
            r.close()  # the client goes away mid-stream
    _idle(engine, loop)
    assert engine.steps - steps < 200  # cancelled, not run to max_tokens

    # a non-streamed request whose client gives up is cancelled too
    steps = engine.steps
    with pytest.raises(httpx.ReadTimeout):
        client.post(CHAT, json={**body, "stream": False}, timeout=httpx.Timeout(60, read=0.5))
    _idle(engine, loop)
    assert engine.steps - steps < 200
    assert client.post(CHAT, json={**body, "stream": False, "max_tokens": 2}).status_code == 200


def test_metrics_text(http, stack):
    client, _ = http
    cfg, tok, engine, loop = stack
    client.post(CHAT, json={"model": MODEL, "messages": Q, "max_tokens": 3, "temperature": 0})
    _stream(client, CHAT, {"model": MODEL, "messages": Q, "max_tokens": 3, "temperature": 0})
    _idle(engine, loop)  # the loop's stats catch up after its next iteration
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = dict(line.rsplit(" ", 1) for line in text.text.splitlines() if not line.startswith("#"))
    assert int(lines['tanuki_requests_total{endpoint="/v1/chat/completions",status="200"}']) >= 2
    assert int(lines['tanuki_requests_total{endpoint="/v1/chat/completions",status="400"}']) >= 1
    assert int(lines['tanuki_requests_total{endpoint="/v1/models",status="401"}']) >= 1
    assert int(lines["tanuki_prompt_tokens_total"]) > 0 and int(lines["tanuki_generation_tokens_total"]) >= 6
    assert lines["tanuki_requests_in_progress"] == "0" and lines["tanuki_kv_cache_usage_ratio"] == "0"
    assert int(lines["tanuki_engine_steps_total"]) > 0
    for h in ("tanuki_time_to_first_token_seconds", "tanuki_e2e_request_latency_seconds",
              "tanuki_inter_token_latency_seconds"):
        assert int(lines[f"{h}_count"]) >= 1 and lines[f'{h}_bucket{{le="+Inf"}}'] == lines[f"{h}_count"]
    assert "# TYPE tanuki_e2e_request_latency_seconds histogram" in text.text


# ----------------------------------------------------------------------------- Tanuki-vision prompts

def _png(size=32, color=(200, 30, 40)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def test_vision_prompts_images_and_engine_refusal(stack, tmp_path):
    """A Tanuki-vision config over the text engine: image parts are decoded (base64 or an allowed file)
    and rendered like `tanuki generate`'s; bad images are 400s naming the part; the text engine's own
    refusal of an image comes back as a 400 with its message."""
    from megatron_tanuki.data import templates
    from megatron_tanuki.data.images import load_image, preprocess
    from megatron_tanuki.models import registry
    from megatron_tanuki.serve import protocol as P
    from megatron_tanuki.serve.app import create_app

    _, tok, engine, loop = stack
    vcfg = registry.get_preset("tanuki-vision-8b-tiny")
    (tmp_path / "ok.png").write_bytes(_png())
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(_png())
    app = create_app(loop, tok, vcfg, _opts(allow_local_images=str(tmp_path)))
    server = app.state.tanuki
    data_url = "data:image/png;base64," + base64.b64encode(_png()).decode()

    def msg(*parts, text="何が見えますか？"):
        return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]

    def part(url):
        return {"type": "image_url", "image_url": {"url": url}}

    req = P.ChatRequest.model_validate({"messages": msg(part(data_url))})
    turns, sources = server.chat_turns(req.messages)
    assert turns == [("user", "<image>\n何が見えますか？")]
    assert server.chat_ids(turns) == templates.prompt_ids(tok, "llava-v1", turns)
    assert server.chat_ids(turns)[1:].count(templates.IMAGE_TOKEN_ID) == 1
    (pixels,) = server.load_images(sources)
    assert torch.equal(pixels, preprocess(load_image(_png(), "x"), vcfg.image_size))
    (_, path), = server.chat_turns(P.ChatRequest.model_validate({"messages": msg(part("ok.png"))}).messages)[1]
    assert path == str((tmp_path / "ok.png").resolve())

    async def go(messages):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.post(CHAT, json={"messages": messages, "max_tokens": 2})

    where = "messages[0].content[0].image_url"
    bad = base64.b64encode(b"not an image at all").decode()
    assert _error(asyncio.run(go(msg(part(f"data:image/png;base64,{bad}")))), 400, param=where).startswith(
        f"{where}: cannot decode image <bytes>: ")
    assert _error(asyncio.run(go(msg(part("data:image/png;base64,@@@")))), 400, param=where) == \
        f"{where}: the data: URL is not valid base64"
    assert _error(asyncio.run(go(msg(part(str(outside))))), 400, param=where) == \
        f"{where}: {outside} is outside the folder allowed by --allow-local-images"
    assert _error(asyncio.run(go(msg(part("../" + outside.name)))), 400, param=where).endswith(
        "is outside the folder allowed by --allow-local-images")
    _error(asyncio.run(go(msg(part("https://example.com/a.png")))), 400, param=where)
    assert _error(asyncio.run(go(msg(text="<image> two marks"))), 400, param="messages") == \
        "messages: 1 <image> marker(s) but 0 image part(s); send images as image_url parts, not as text"
    # everything checks out on the HTTP side; the text-only engine refuses the image itself
    r = asyncio.run(go(msg(part(data_url))))
    assert _error(r, 400) == "this model has no vision tower; the request has an image"
    _idle(engine, loop)
