"""When progress bars show: one switch for every long-running command (convert, verify, generate).

A bar on stderr when it is a terminal (or when the caller asks); ``TANUKI_PROGRESS=1`` forces it on
(logs of batch jobs), ``0`` off, whatever the caller says.
"""
from __future__ import annotations

import os
import sys


def progress_disabled(enabled: bool | None = None) -> bool:
    force = os.environ.get("TANUKI_PROGRESS", "")
    if force in ("0", "1"):
        return force == "0"
    return not sys.stderr.isatty() if enabled is None else not enabled
