"""Images for Tanuki-vision: decode, convert to RGB, resize and normalize as SigLIP's processor.

SigLIP's processor: resize to the square input size with bicubic resampling (aspect ratio not
kept), rescale by 1/255, normalize with mean 0.5 and std 0.5 per channel -> values in [-1, 1].
For S2 the square size is 768.

Bad input never reaches the model: an undecodable or truncated file raises ImageError naming the
sample; non-RGB modes are converted with PIL's ``convert("RGB")`` exactly as LLaVA-JP did in
training (RGBA/LA drop alpha, L/P/CMYK/I;16 map to RGB); an image smaller than one 14-px patch on
either side is refused, since it holds no visual content at the model's resolution.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MIN_SIDE = 14
MAX_PIXELS = 40_000_000   # a small file may declare a huge canvas (a server decodes client images)
MEAN = STD = 0.5


class ImageError(ValueError):
    pass


def load_image(source, sample: str) -> Image.Image:
    """``source``: a path or bytes. Returns a fully decoded RGB image."""
    where = source if isinstance(source, str) else "<bytes>"
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        if img.size[0] * img.size[1] > MAX_PIXELS:  # checked from the header, before any decoding
            raise ImageError(f"{sample}: image {where} is {img.size[0]}x{img.size[1]} px, more than "
                             f"{MAX_PIXELS // 1_000_000} megapixels")
        img.load()  # decode now: truncated files fail here, not later inside a batch
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{sample}: image file not found: {where}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{sample}: cannot decode image {where}: {e}") from None
    if min(img.size) < MIN_SIDE:
        raise ImageError(f"{sample}: image {where} is {img.size[0]}x{img.size[1]} px, smaller than one "
                         f"{MIN_SIDE}-px patch")
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess(img: Image.Image, size: int = 768) -> torch.Tensor:
    """RGB PIL image -> [3, size, size] float32 in [-1, 1]."""
    resized = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    x = np.asarray(resized, dtype=np.float32) * (1 / 255)
    x = (x - MEAN) / STD
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


def sample_image(size: int = 768) -> Image.Image:
    """A deterministic picture (gradient, red disc, blue square, green bar) for checks without data."""
    from PIL import ImageDraw

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([xx * 200 + 30, yy * 180 + 40, (1 - xx) * 120 + 60], axis=-1).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    d = ImageDraw.Draw(img)
    s = size
    d.ellipse([s * 0.08, s * 0.1, s * 0.42, s * 0.44], fill=(220, 30, 40))
    d.rectangle([s * 0.55, s * 0.5, s * 0.9, s * 0.85], fill=(30, 60, 210))
    d.rectangle([s * 0.1, s * 0.7, s * 0.45, s * 0.78], fill=(40, 180, 70))
    return img
