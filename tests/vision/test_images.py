"""Image decoding, conversion and SigLIP preprocessing; every bad image gives a named error."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_tanuki.data.images import ImageError, load_image, preprocess


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_preprocess_is_bicubic_rescale_normalize():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    x = preprocess(img, size=32)
    ref = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float64) / 255 * 2 - 1
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert np.abs(x.permute(1, 2, 0).numpy() - ref).max() < 1e-6
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA"])
def test_non_rgb_modes_convert_like_llava_jp(mode, tmp_path):
    img = Image.new(mode, (20, 16))
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(path)
    out = load_image(str(path), "sample 3")
    assert out.mode == "RGB" and out.size == (20, 16)
    assert np.array_equal(np.asarray(out), np.asarray(Image.open(path).convert("RGB")))


def test_truncated_file_names_the_sample(tmp_path):
    data = _png(Image.new("RGB", (64, 64), "red"))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"data.jsonl:7: cannot decode image .*cut.png"):
        load_image(str(path), "data.jsonl:7")


def test_garbage_bytes_and_missing_file(tmp_path):
    with pytest.raises(ImageError, match="s1: cannot decode image <bytes>"):
        load_image(b"not an image at all", "s1")
    with pytest.raises(ImageError, match="s2: image file not found: .*nope.png"):
        load_image(str(tmp_path / "nope.png"), "s2")


def test_one_pixel_image_is_refused():
    with pytest.raises(ImageError, match="s9: image <bytes> is 1x1 px, smaller than one 14-px patch"):
        load_image(_png(Image.new("RGB", (1, 1))), "s9")


def test_a_huge_canvas_is_refused_from_its_header_before_decoding():
    """A small PNG may declare a 13000 x 13000 canvas (0.5 GB decoded): refused by name, undecoded."""
    import io

    import pytest
    from PIL import Image

    from megatron_tanuki.data.images import ImageError, load_image

    buf = io.BytesIO()
    Image.new("1", (13000, 13000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ImageError) as e:
        load_image(buf.getvalue(), "req 7")
    assert str(e.value) == "req 7: image <bytes> is 13000x13000 px, more than 40 megapixels"
