"""The NeMo zarr reader on a checkpoint written by megatron-core's own zarr strategy (tests/data/nemo-zarr-tiny).

Reassembly is checked against each TP rank's own shards as held before saving; bad folders must fail
with a message naming the file and tensor.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from megatron_tanuki.convert.nemo_zarr import NemoCheckpoint, ZarrArray
from megatron_tanuki.convert.safetensors_io import CheckpointError

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "nemo-zarr-tiny")
PER_LAYER = ["mlp.linear_fc1.layer_norm_bias", "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight",
             "mlp.linear_fc2.weight", "self_attention.linear_proj.weight",
             "self_attention.linear_qkv.layer_norm_bias", "self_attention.linear_qkv.layer_norm_weight",
             "self_attention.linear_qkv.weight"]
FC1 = "model.decoder.layers.mlp.linear_fc1.weight"


@pytest.fixture(scope="module")
def ckpt():
    return NemoCheckpoint(FIXTURE)


@pytest.fixture
def copy(tmp_path):
    """A writable copy of the fixture without reference/ (to break)."""
    dst = tmp_path / "nemo"
    shutil.copytree(FIXTURE, dst, ignore=shutil.ignore_patterns("reference"))
    return dst


def _error(folder) -> str:
    with pytest.raises(CheckpointError) as e:
        NemoCheckpoint(str(folder))
    return str(e.value)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def test_names_shapes_dtypes_and_side_files(ckpt):
    layers = [f"decoder.layers.{i}.{x}" for i in range(4) for x in PER_LAYER]
    assert ckpt.names() == (["embedding.word_embeddings.weight"] + layers
                            + ["decoder.final_layernorm.bias", "decoder.final_layernorm.weight", "output_layer.weight"])
    shapes = {"mlp.linear_fc1.weight": (128, 64), "mlp.linear_fc2.weight": (64, 128),
              "self_attention.linear_proj.weight": (64, 64), "self_attention.linear_qkv.weight": (128, 64)}
    for n in ckpt.names():
        tail = n.split(".", 3)[-1] if n.startswith("decoder.layers.") else n
        if n.endswith("weight") and "norm" not in n:
            want = shapes.get(tail, (256, 64))
            assert (ckpt.shape(n), ckpt.dtype(n), ckpt.nbytes(n)) == (want, torch.bfloat16, want[0] * want[1] * 2), n
        else:  # LayerNorm parameters: fp32 in this fixture (the local spec's torch LayerNorm)
            assert (ckpt.shape(n), ckpt.dtype(n), ckpt.nbytes(n)) == ((64,), torch.float32, 256), n
        t = ckpt.get(n)
        assert (tuple(t.shape), t.dtype) == (ckpt.shape(n), ckpt.dtype(n))
    assert ckpt.shard_of["decoder.layers.2.mlp.linear_fc1.weight"] == "model_weights/" + FC1
    assert ckpt.shard_of["output_layer.weight"] == "model_weights/model.output_layer.weight"
    assert ckpt.yaml["normalization"] == "layernorm1p" and ckpt.config is None
    assert ckpt.weights_dir == os.path.join(os.path.abspath(FIXTURE), "model_weights")
    assert ckpt.side_files() == [] and ckpt.tokenizer_file() is None


def test_every_tensor_equals_the_reference_shards_and_covers_them(ckpt):
    full = {}
    for n in ckpt.names():
        if n.startswith("decoder.layers.0."):
            x = n[len("decoder.layers.0."):]
            full["model.decoder.layers." + x] = torch.stack([ckpt.get(f"decoder.layers.{i}.{x}") for i in range(4)])
        elif not n.startswith("decoder.layers."):
            full["model." + n] = ckpt.get(n)
    covered = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in full.items()}
    checked = 0
    for rank in range(8):
        for entry in torch.load(os.path.join(FIXTURE, "reference", f"rank{rank}.pt"), weights_only=False):
            if "data" not in entry:  # _extra_state objects: not weights
                assert entry["key"].endswith("._extra_state")
                continue
            t = full[entry["key"]]
            assert tuple(t.shape) == tuple(entry["global_shape"]) and str(t.dtype) == entry["dtype"]
            size = (1,) * entry["prepend_axis_num"] + tuple(entry["local_shape"])
            region = tuple(slice(o, o + s) for o, s in zip(entry["global_offset"], size))
            assert torch.equal(_bits(t[region]), _bits(entry["data"].reshape(size))), (rank, entry["key"])
            covered[entry["key"]][region] = True
            checked += 1
    assert checked == 8 * (4 * 8 + 4)  # 8 ranks x (4 layers x 8 per-layer keys + 4 unstacked)
    assert sorted(k for k, c in covered.items() if not c.all()) == []


def test_a_layer_slice_reads_only_that_layers_chunk_files(copy):
    want = NemoCheckpoint(FIXTURE).get("decoder.layers.0.mlp.linear_fc1.weight")
    for f in os.listdir(copy / "model_weights" / FC1):
        if not f.startswith(("0.", ".")):
            os.remove(copy / "model_weights" / FC1 / f)
    ck = NemoCheckpoint(str(copy))
    assert torch.equal(_bits(ck.get("decoder.layers.0.mlp.linear_fc1.weight")), _bits(want))
    with pytest.raises(CheckpointError) as e:
        ck.get("decoder.layers.2.mlp.linear_fc1.weight")
    assert str(e.value) == f"{copy}/model_weights: tensor {FC1} chunk 2.0.0 is missing"


def test_truncated_chunk_file(copy):
    path = copy / "model_weights" / FC1 / "1.3.0"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(CheckpointError) as e:
        NemoCheckpoint(str(copy)).get("decoder.layers.1.mlp.linear_fc1.weight")
    assert str(e.value) == f"{copy}/model_weights: tensor {FC1} chunk 1.3.0 has 2046 bytes, expected 2048"


def _edit_zarray(copy, key, **fields):
    path = copy / "model_weights" / key / ".zarray"
    meta = json.loads(path.read_text())
    meta.update(fields)
    path.write_text(json.dumps(meta))


def test_integer_dtype_is_refused(copy):
    _edit_zarray(copy, FC1, dtype="<i4")
    assert _error(copy) == (f"{copy}/model_weights/{FC1}: dtype '<i4' is not a weight dtype "
                            f"(supported: ['<f2', '<f4', '<f8', 'bfloat16'])")


def test_compressed_array_is_refused(copy):
    _edit_zarray(copy, "model.output_layer.weight", compressor={"id": "blosc", "cname": "lz4"})
    assert _error(copy) == (f"{copy}/model_weights/model.output_layer.weight/.zarray: compressor is "
                            f"{{'id': 'blosc', 'cname': 'lz4'}}, only None is supported "
                            f"(uncompressed Zarr-v2 C-order chunks)")


def test_torch_dist_checkpoint_is_refused(copy):
    (copy / "model_weights" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    assert _error(copy) == (f"{copy}/model_weights/metadata.json: sharded_backend is 'torch_dist', not 'zarr': "
                            f"this reads NeMo zarr checkpoints only (torch_dist is megatron-core's own format)")


def test_num_layers_disagreeing_with_the_arrays(copy):
    cfg = copy / "model_config.yaml"
    cfg.write_text(cfg.read_text().replace("num_layers: 4", "num_layers: 3"))
    assert _error(copy) == (f"{copy}/model_weights: tensor model.decoder.layers.mlp.linear_fc1.layer_norm_bias "
                            f"stacks 4 layers on axis 0 (shape [4, 64]), but {cfg} says num_layers: 3")


def test_missing_model_config(copy):
    os.remove(copy / "model_config.yaml")
    assert _error(copy) == f"missing model_config.yaml in {copy} (not an unpacked .nemo folder)"


def test_tokenizer_named_by_the_yaml_or_the_only_model_file(copy):
    (copy / "a.model").write_bytes(b"sp")
    assert NemoCheckpoint(str(copy)).side_files() == ["a.model"]
    (copy / "b.model").write_bytes(b"sp")
    assert NemoCheckpoint(str(copy)).side_files() == []  # two candidates, the yaml names neither
    cfg = copy / "model_config.yaml"
    cfg.write_text(cfg.read_text().replace("  model: null", "  model: nemo:b.model"))
    ck = NemoCheckpoint(str(copy))
    assert ck.side_files() == ["b.model"] and ck.tokenizer_file() == str(copy / "b.model")


def test_edge_chunks_and_slash_separator(tmp_path):
    """A hand-written array: 5 x 3 in 2 x 2 chunks, edge chunks stored full-size, nested chunk folders."""
    a = np.arange(15, dtype="<f4").reshape(5, 3)
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / ".zarray").write_text(json.dumps({"zarr_format": 2, "shape": [5, 3], "chunks": [2, 2],
                                                "dtype": "<f4", "order": "C", "compressor": None,
                                                "fill_value": None, "filters": None, "dimension_separator": "/"}))
    for i in range(3):
        for j in range(2):
            chunk = np.full((2, 2), -1, dtype="<f4")
            part = a[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            chunk[:part.shape[0], :part.shape[1]] = part
            (folder / str(i)).mkdir(exist_ok=True)
            chunk.tofile(folder / str(i) / str(j))
    arr = ZarrArray(str(folder))
    assert (arr.shape, arr.chunks, arr.dtype) == ((5, 3), (2, 2), torch.float32)
    assert torch.equal(arr.read(), torch.from_numpy(a))
    assert [arr.read(i).tolist() for i in range(5)] == a.tolist()
