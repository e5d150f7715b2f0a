"""Parameter counts from the built model (meta device) equal the released models'."""
import json
import os
import subprocess
import sys

import pytest

EXPECTED = {
    "tanuki-8b": (7_512_264_704, 7_512_264_704),
    "tanuki-8x8b": (46_973_325_312, 13_150_457_856),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_model_info_counts(single_process, preset):
    from megatron_tanuki.models.registry import model_info

    info = model_info(preset)
    assert (info["parameters"]["total"], info["parameters"]["active"]) == EXPECTED[preset]


def test_cli_model_info_json():
    tanuki = os.path.join(os.path.dirname(sys.executable), "tanuki")
    out = subprocess.run([tanuki, "model-info", "tanuki-8x8b", "--json"], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    assert info["parameters"]["total"] == 46973325312
    assert info["parameters"]["active"] == 13150457856


def test_cli_unknown_preset_is_a_clear_error():
    tanuki = os.path.join(os.path.dirname(sys.executable), "tanuki")
    r = subprocess.run([tanuki, "model-info", "tanuki-70b"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown preset 'tanuki-70b'" in r.stderr and "tanuki-8x8b" in r.stderr
