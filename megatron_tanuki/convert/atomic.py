"""Output folders that appear complete or not at all.

Everything is written under ``OUT.tmp-<pid>-<random>`` beside the target and renamed to ``OUT``
only when the writer finished; a crash or an error removes the temporary folder, so no folder
that looks finished is ever left half-written.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid


class OutputExists(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool = False):
    out = os.path.abspath(out.rstrip("/"))
    if os.path.exists(out) and not overwrite:
        raise OutputExists(f"output path exists: {out} (pass --overwrite to replace it)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):
        old = f"{out}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
