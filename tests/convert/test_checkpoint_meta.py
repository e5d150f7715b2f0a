"""tanuki.json (models/checkpoint_meta.py): round trip, the old import path, named errors."""
import json
import os
import re

import pytest
import torch

from megatron_tanuki.models import checkpoint_meta as cm
from megatron_tanuki.models.registry import get_preset


@pytest.mark.parametrize("preset", ["tanuki-8x8b-tiny", "tanuki-vision-8b-tiny"])
def test_round_trip_carries_config_dtype_and_hf_vocab(tmp_path, preset):
    cfg = get_preset(preset)
    cm.write_meta(str(tmp_path), cfg, torch.bfloat16, 65024, source="test")
    meta = cm.read_meta(str(tmp_path))
    assert meta.config == cfg and meta.dtype is torch.bfloat16 and meta.hf_vocab_size == 65024
    cfg2, dtype, hf_vocab = meta  # the tuple form every caller used
    assert (cfg2, dtype, hf_vocab) == (cfg, torch.bfloat16, 65024)
    raw = json.load(open(tmp_path / cm.META_FILE))
    assert raw["hf_vocab_size"] == 65024 and raw["dtype"] == "bf16" and raw["source"] == "test"


def test_convert_engine_still_exports_the_same_names():
    from megatron_tanuki.convert import engine

    assert engine.META_FILE == cm.META_FILE == "tanuki.json"
    assert engine.meta_json is cm.meta_json and engine.read_meta is cm.read_meta


def _write(tmp_path, text):
    with open(os.path.join(tmp_path, cm.META_FILE), "w") as f:
        f.write(text)
    return str(tmp_path)


def test_bad_files_name_the_file_and_field(tmp_path):
    with pytest.raises(cm.MetaError, match=rf"^{re.escape(str(tmp_path))}: no tanuki.json \(not written by megatron_tanuki\)$"):
        cm.read_meta(str(tmp_path))
    good = json.loads(cm.meta_json(get_preset("tanuki-8b-tiny"), torch.float32, 65024))
    path = os.path.join(tmp_path, cm.META_FILE)
    with pytest.raises(cm.MetaError, match=rf"^{re.escape(path)}: not valid JSON"):
        cm.read_meta(_write(tmp_path, "{"))
    with pytest.raises(cm.MetaError, match=rf"^{re.escape(path)}: no field 'hf_vocab_size'$"):
        cm.read_meta(_write(tmp_path, json.dumps({k: v for k, v in good.items() if k != "hf_vocab_size"})))
    with pytest.raises(cm.MetaError, match=rf"^{re.escape(path)}: dtype 'fp8' is not one of bf16, fp16, fp32$"):
        cm.read_meta(_write(tmp_path, json.dumps({**good, "dtype": "fp8"})))
    with pytest.raises(cm.MetaError, match=rf"^{re.escape(path)}: field 'model' does not describe a known model"):
        cm.read_meta(_write(tmp_path, json.dumps({**good, "model": {**good["model"], "layers": 3}})))
