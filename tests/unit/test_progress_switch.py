"""One progress switch for convert and generate: TANUKI_PROGRESS=1/0 beats the caller and the terminal check."""
import pytest

from megatron_tanuki.runtime.progress import progress_disabled


@pytest.mark.parametrize("env, enabled, disabled", [
    ("1", False, False), ("0", True, True), ("", True, False), ("", False, True), ("", None, True),  # pytest: no tty
])
def test_progress_switch(monkeypatch, env, enabled, disabled):
    monkeypatch.setenv("TANUKI_PROGRESS", env)
    assert progress_disabled(enabled) is disabled
