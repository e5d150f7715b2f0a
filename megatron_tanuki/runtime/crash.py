"""Tell a user's mistake from our crash, and keep the crash's traceback.

A user error (bad config, missing file, a layout that does not divide) is one line on stderr: the
traceback would only bury the message. Anything else is a bug, in our code or a library, and the
traceback is what a maintainer needs: it goes to a file beside the run (and to stderr with
``TANUKI_DEBUG=1``), and the one-line message says where it is.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The kinds our code raises for bad input; a library raising one of these is still a crash.
_USER_KINDS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError)


def debug() -> bool:
    return os.environ.get("TANUKI_DEBUG", "") not in ("", "0")


def user_message(exc: BaseException) -> str | None:
    """The one-line message when ``exc`` is a user error, else None.

    A user error is one of our deliberate ``raise`` statements (the innermost frame is a ``raise``
    in megatron_tanuki) of a kind we use for bad input, or a missing/existing file named by the
    operating system. An ``IndexError`` from torch or a ``ValueError`` deep in megatron-core is not.
    """
    if isinstance(exc, (FileNotFoundError, FileExistsError, NotADirectoryError)) and exc.filename:
        return str(exc)
    if not isinstance(exc, _USER_KINDS):
        return None
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:  # never raised here (e.g. rebuilt in another process): no evidence it is ours
        return None
    last = frames[-1]
    ours = os.path.abspath(last.filename).startswith(_PACKAGE + os.sep)
    if not (ours and (last.line or "").lstrip().startswith("raise")):
        return None
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def crash_path(directory: str | None = None) -> str:
    """``DIR/tanuki-crash-<time>[-rank<R>].log`` beside the run; the temp folder if DIR is unwritable."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID")
    name = f"tanuki-crash-{stamp}" + (f"-rank{rank}" if rank not in (None, "") else "") + ".log"
    for d in (directory or os.getcwd(), tempfile.gettempdir()):
        try:
            os.makedirs(d, exist_ok=True)
            if os.access(d, os.W_OK):
                return os.path.join(os.path.abspath(d), name)
        except OSError:
            continue
    return os.path.join(tempfile.gettempdir(), name)


def write_traceback(text: str, directory: str | None = None) -> str:
    path = crash_path(directory)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{' '.join(sys.argv)}\n{text}")
    return path


def report(where: str, exc: BaseException, run_dir: str | None = None) -> int:
    """Print the one-line message for ``exc``; keep a crash's traceback. Returns the exit code:
    2 for a user error, 1 for a crash."""
    from megatron_tanuki.runtime.spawn import RankFailed

    ranks = isinstance(exc, RankFailed)
    text = str(exc) if ranks else "".join(traceback.format_exception(exc))
    msg = exc.user_message if ranks else user_message(exc)
    if debug():
        print(text, file=sys.stderr)
    if msg is not None:
        print(f"{where}: error: {msg}", file=sys.stderr)
        return 2
    path = write_traceback(text, run_dir)
    first = exc.first_error if ranks else (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0]
    print(f"{where}: internal error: {first} (traceback in {path}; TANUKI_DEBUG=1 prints it)", file=sys.stderr)
    return 1


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """Slurm's time limit and scancel send SIGTERM: turn it into SystemExit so that ``finally``
    blocks run (unfinished OUT.tmp-* folders are removed on the way out)."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)
