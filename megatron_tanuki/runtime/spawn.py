"""Start N local ranks of a function (tests, the demo, ``convert verify``) without torchrun.

Each rank is a fresh *spawned* interpreter (never fork: a parent that already ran OpenMP or gloo
work can deadlock a forked child) with torchrun's environment variables set, so the code under
test reads its rank exactly as it would on a cluster. Return values come back through files;
an exception on any rank is re-raised in the parent with that rank's traceback.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.util
import os
import pickle
import signal
import socket
import tempfile
import traceback

import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """A rank raised. ``user_message``: the one-line message when that was a user error (bad
    input, judged in the rank where the traceback was alive), else None; the text holds every
    failing rank's traceback."""

    def __init__(self, text: str, user_message: str | None = None, first_error: str | None = None):
        super().__init__(text)
        self.user_message = user_message
        self.first_error = first_error or (text.splitlines() or [""])[0]


def launcher_rank(env=None) -> str | None:
    """This process's global rank when torchrun or an srun step started it, else None."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return env["RANK"]
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return env["SLURM_PROCID"]
    return None


def run_job(fn, job, nproc: int) -> list:
    """Results of ``fn(job)`` on every rank of a batch command (generate, score-reward): this rank
    under a launcher; one process here; else ``nproc`` spawned local ranks (``job.nproc`` set)."""
    if launcher_rank() is not None:
        return [fn(job)]
    if nproc == 1:
        return [fn(job)]
    return run_ranks(fn, nproc, dataclasses.replace(job, nproc=nproc))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_store(world_size: int):
    """A rendezvous store served by this process on 127.0.0.1 (kernel-chosen port) for spawned ranks."""
    import datetime

    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                    timeout=datetime.timedelta(minutes=30))


def signal_ranks(sig: int) -> None:
    """Send ``sig`` to the local ranks this process started (not to the resource tracker): how a
    launcher passes scancel's SIGTERM on to its ranks."""
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass


def _exit_now(code: int) -> None:
    """Leave at once (peers may be stuck in a collective), but first stop our helper processes
    (a multiprocessing Manager, for one, would outlive us)."""
    try:
        multiprocessing.util._exit_function()
    finally:
        os._exit(code)


def _entry(local_rank: int, world_size: int, port: int, outdir: str, fn, args, kwargs, env):
    signal.signal(signal.SIGTERM, lambda *_: _exit_now(1))
    os.environ.update(env)
    # A spawned interpreter starts with fresh warning filters: install ours before megatron loads.
    from megatron_tanuki import _quiet

    _quiet.install()
    import torch

    # torch is already imported here (unpickling fn), so OMP_NUM_THREADS alone would not apply.
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      # The parent hosts the rendezvous store (see run_ranks): every rank is its client,
                      # as under torchrun, whose agent hosts it the same way.
                      TORCHELASTIC_USE_AGENT_STORE="True")
    path = os.path.join(outdir, f"rank{local_rank}.pkl")
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException as e:  # reported to the parent, then re-raised there
        from megatron_tanuki.runtime.crash import user_message

        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", user_message(e))
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)
    if result[0] == "error":
        _exit_now(1)
    try:
        import torch.distributed as dist

        from megatron_tanuki.runtime.distributed import shutdown
        if dist.is_initialized():
            shutdown()
    except Exception:
        pass


def run_ranks(fn, world_size: int, *args, env: dict | None = None, **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` local ranks; return the results by rank."""
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    # The store is bound here, on a port the kernel picks, and held until the ranks are done: a port
    # probed free and handed to rank 0 to bind later can be taken meanwhile (EADDRINUSE under load).
    store = _host_store(world_size)
    with tempfile.TemporaryDirectory(prefix="tanuki-ranks-") as outdir:
        ctx = mp.start_processes(
            _entry, args=(world_size, store.port, outdir, fn, args, kwargs, env),
            nprocs=world_size, join=False, start_method="spawn")
        try:
            while not ctx.join():
                pass
        except Exception as e:
            failure = e
        else:
            failure = None
        results, errors, user, first = [], [], None, None
        for r in range(world_size):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value, *more = pickle.load(f)
            if status == "error":
                errors.append(f"--- rank {r} ---\n{value}")
                first = first or f"rank {r}: {value.splitlines()[0]}"
                user = user or (more[0] if more else None)
            results.append(value if status == "ok" else None)
        if errors:
            raise RankFailed("\n".join(errors), user_message=user, first_error=first)
        if failure is not None:
            raise RankFailed(str(failure))
        return results
