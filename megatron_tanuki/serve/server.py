"""`tanuki serve`: start the ranks, the engine loop on each, and the HTTP server on rank 0.

Threads on rank 0: the main thread runs the engine loop (it owns every torch.distributed call);
uvicorn runs in a second thread with its own asyncio loop. Other ranks run only the loop and follow
rank 0's broadcasts. SIGTERM / SIGINT on rank 0: stop accepting (503), let in-flight requests
finish for ``shutdown_grace_s``, cancel the rest, stop every rank, exit 0. Other ranks ignore the
signals (Slurm sends them to every task; they leave when rank 0 says so).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
import socket
import threading
import time

from megatron_tanuki.serve.options import ServeOptions


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(opts: ServeOptions) -> ServeOptions:
    """Refuse what cannot work before any model is loaded; fill the API key from TANUKI_API_KEY."""
    if opts.api_key is None and os.environ.get("TANUKI_API_KEY"):
        opts = dataclasses.replace(opts, api_key=os.environ["TANUKI_API_KEY"])
    if not is_loopback(opts.host) and not opts.api_key and not opts.insecure_no_api_key:
        raise ValueError(f"--host {opts.host} is reachable from other machines: give --api-key (or TANUKI_API_KEY), "
                         "or --insecure-no-api-key to serve without one")
    for name in ("max_concurrency", "port", "max_prompt_tokens", "max_tokens_limit", "max_seq_len", "max_body_bytes"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be positive")
    if opts.port > 65535:
        raise ValueError(f"--port {opts.port}: must be at most 65535")
    if opts.shutdown_grace_s < 0:
        raise ValueError(f"--shutdown-grace {opts.shutdown_grace_s}: must be >= 0")
    if opts.allow_local_images is not None and not os.path.isdir(opts.allow_local_images):
        raise ValueError(f"--allow-local-images {opts.allow_local_images}: not a folder")
    if opts.chat is not None:
        from megatron_tanuki.data import templates

        templates.get(opts.chat)
    from megatron_tanuki.inference.generate import check_fp8

    check_fp8(opts.fp8)
    if opts.fp8 and opts.dtype == "fp32":
        raise ValueError(f"--fp8 {opts.fp8} with --dtype fp32: FP8 runs with bf16 around it; drop --dtype")
    if opts.max_tokens_per_step % 64 or opts.max_tokens_per_step < 64:
        raise ValueError(f"--max-tokens-per-step {opts.max_tokens_per_step}: must be a positive multiple of 64")
    return opts


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve_rank(opts: ServeOptions) -> dict:
    """One rank of `tanuki serve`; returns when the server has shut down."""
    import torch.distributed as dist
    import uvicorn

    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.inference.engine import Engine, EngineOptions
    from megatron_tanuki.inference.generate import checkpoint_tokenizer, load_model
    from megatron_tanuki.models import registry
    from megatron_tanuki.serve.loop import EngineLoop

    cfg, chunks, hf_vocab = load_model(opts)
    tok = load_tokenizer(opts.tokenizer or checkpoint_tokenizer(opts.ckpt))
    leader = dist.get_rank() == 0
    llm = registry.language_model(cfg)
    context = opts.max_seq_len or llm.max_position_embeddings
    if context > llm.max_position_embeddings:
        raise ValueError(f"--max-seq-len {context} exceeds {cfg.name}'s max_position_embeddings "
                         f"{llm.max_position_embeddings}")
    engine = Engine(chunks, tok, EngineOptions(max_sequence_length=context, kv_memory_gb=opts.kv_memory_gb,
                                               max_tokens=opts.max_tokens_per_step, seed=opts.seed),
                    vocab_limit=min(tok.vocab_size, hf_vocab), log=print if leader else (lambda *_: None))
    loop = EngineLoop(engine, tok, leader=leader, world_size=dist.get_world_size())
    if not leader:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        loop.serve_forever()
        return {"rank": dist.get_rank()}

    from megatron_tanuki.serve.app import create_app

    name = opts.served_model_name or os.path.basename(os.path.normpath(opts.ckpt))
    opts = dataclasses.replace(opts, max_seq_len=context, served_model_name=name)
    try:
        app = create_app(loop, tok, cfg, opts)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        sock = _bind(opts.host, opts.port)
    except BaseException:  # the other ranks already wait in the loop: release them, then fail
        loop.shutdown(0)
        loop.serve_forever()
        raise
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tanuki-http", daemon=True)

    def stop(signum, _frame):
        # runs on the main thread between two bytecodes of the engine loop: only reentrant calls here
        # (os.write, not print -- the thread may be inside a print; the loop's inbox is a SimpleQueue)
        if not loop.stopping.is_set():
            os.write(2, f"[tanuki] serve: {signal.Signals(signum).name}: draining (up to "
                        f"{opts.shutdown_grace_s:g} s)\n".encode())
            loop.stopping.set()
            loop.shutdown(opts.shutdown_grace_s)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    http.start()
    t0 = time.monotonic()
    while not server.started and http.is_alive() and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    if not server.started:
        loop.shutdown(0)
        loop.serve_forever()
        raise RuntimeError(f"the HTTP server did not start on {opts.host}:{opts.port}")
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    print(f"[tanuki] serve: http://{host}:{opts.port}/v1 ready (model {name!r}, "
          f"{'API key required' if opts.api_key else 'no API key'})", flush=True)
    loop.serve_forever(alive=http.is_alive)
    server.should_exit = True
    http.join(timeout=10)
    sock.close()
    return {"rank": 0, "steps": engine.steps}


def run(opts: ServeOptions) -> list:
    """Under torchrun/srun: this rank; else ``nproc`` local ranks (default TP*PP*EP)."""
    from megatron_tanuki.runtime.spawn import launcher_rank, run_ranks

    opts = check_options(opts)
    if launcher_rank() is not None:
        from megatron_tanuki.runtime.distributed import shutdown

        result = serve_rank(opts)
        shutdown()  # destroy the process groups before exit (NCCL teardown at exit can hang)
        return [result]
    # A busy port fails here, before the model loads. The socket stays bound (never listening) while the
    # ranks run: the kernel then hands this port to none of their own sockets (the rendezvous store,
    # gloo's pairs), which it otherwise may, having seen it free; rank 0 binds it again (SO_REUSEADDR).
    reserved = _bind(opts.host, opts.port)
    try:
        nproc = opts.nproc or opts.tp * opts.pp * opts.ep
        if nproc == 1:
            return [serve_rank(opts)]
        _forward_signals_to_children()
        return run_ranks(serve_rank, nproc, dataclasses.replace(opts, nproc=nproc))
    finally:
        reserved.close()


def _forward_signals_to_children() -> None:
    """Local ranks run in child processes: SIGTERM / SIGINT to this process reach rank 0 as SIGTERM
    (it drains and stops the others), instead of tearing the children down mid-request."""
    from megatron_tanuki.runtime.spawn import signal_ranks

    def forward(signum, _frame):
        signal_ranks(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
