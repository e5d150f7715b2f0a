"""The demo's generated dataset: one coloured shape on a noisy background, Japanese captions and Q&A.

Each image has a colour (6), a shape (5) and a position on a 3 x 3 grid (9), so chance is 1/6,
1/5 and 1/9. Files are LLaVA-JP's own formats -- an image folder, ``stage1.json`` (``plain``:
``<image>`` then the caption) and ``stage2.json`` (``v1`` Q&A) -- plus ``text.jsonl`` (the captions
and answers as plain text, for the language model's own pretraining) and ``heldout.jsonl`` (the
truth for images never trained on).
"""
from __future__ import annotations

import json
import math
import os
import random

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"赤い": (215, 35, 35), "青い": (35, 75, 225), "黄色い": (240, 215, 30), "緑の": (30, 165, 60),
          "白い": (250, 250, 250), "黒い": (15, 15, 15)}
SHAPES = ("円", "四角", "三角", "十字", "星")
POSITIONS = ("左上", "上", "右上", "左", "中央", "右", "左下", "下", "右下")
DESCRIBE = "画像を説明してください。"
QUESTIONS = (
    ("図形は何色ですか？", "{c}です。"),
    ("どんな形ですか？", "{s}です。"),
    ("図形はどこにありますか？", "{p}にあります。"),
)
VERSION = 8


def caption(color: str, shape: str, pos: str) -> str:
    return f"{color}{shape}が{pos}にあります。"


def color_noun(color: str) -> str:
    return color[:-1]  # 赤い -> 赤, 緑の -> 緑


def draw(color: str, shape: str, pos: str, size: int, rng: random.Random) -> Image.Image:
    bg = np.array([rng.randint(95, 165) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**31)).normal(0, 10, (size, size, 3))
    img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    row, col = divmod(POSITIONS.index(pos), 3)
    cell = size / 3
    r = cell * rng.uniform(0.36, 0.46)
    cx = (col + 0.5) * cell + rng.uniform(-0.05, 0.05) * cell
    cy = (row + 0.5) * cell + rng.uniform(-0.05, 0.05) * cell
    fill = COLORS[color]
    if shape == "円":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "四角":
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "三角":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "十字":
        w = r * 0.35
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # 星
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=fill)
    return img


def generate(root: str, n_train: int = 3000, n_heldout: int = 90, size: int = 112, seed: int = 0,
             log=print) -> dict:
    """Write the dataset under ``root`` once (a stamp file marks it complete); return its paths."""
    paths = {k: os.path.join(root, f) for k, f in (("stage1", "stage1.json"), ("stage2", "stage2.json"),
                                                   ("text", "text.jsonl"), ("heldout", "heldout.jsonl"),
                                                   ("images", "images"))}
    stamp = os.path.join(root, f".complete-v{VERSION}-{n_train}-{n_heldout}-{size}-{seed}")
    if os.path.isfile(stamp):
        return paths
    log(f"[demo] writing {n_train} + {n_heldout} generated images with Japanese captions to {root}")
    os.makedirs(paths["images"], exist_ok=True)
    rng = random.Random(seed)
    stage1, stage2, text, heldout = [], [], [], []
    for i in range(n_train + n_heldout):
        c, s, p = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(POSITIONS)
        name = f"{i:05d}.png"
        draw(c, s, p, size, rng).save(os.path.join(paths["images"], name))
        cap = caption(c, s, p)
        if i >= n_train:
            heldout.append({"image": name, "color": c, "shape": s, "position": p, "caption": cap})
            continue
        stage1.append({"id": name, "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": cap}]})
        q, a = rng.choice(((DESCRIBE, cap),) * 9 + QUESTIONS)  # 3/4 describe, 1/12 each question
        stage2.append({"id": name, "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{q}"},
            {"from": "gpt", "value": a.format(c=color_noun(c), s=s, p=p)}]})
        text.append({"text": cap})
        text.append({"text": f"{q} {a.format(c=color_noun(c), s=s, p=p)}"})
    for key, data in (("stage1", stage1), ("stage2", stage2)):
        with open(paths[key], "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
    for key, data in (("text", text), ("heldout", heldout)):
        with open(paths[key], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in data)
    open(stamp, "w").close()
    return paths


def _first(options, text):
    """The option named first in ``text`` (the longer one on ties: 左上 before 左)."""
    hits = [(text.find(o), -len(o), o) for o in options if o in text]
    return min(hits)[2] if hits else None


def parse(text: str) -> dict:
    """The colour, shape and position a caption names (None where it names none)."""
    return {"color": _first(list(COLORS), text), "shape": _first(SHAPES, text),
            "position": _first(POSITIONS, text)}


def score(generated: str, truth: dict) -> dict:
    """Whether the generated text names the true colour, shape and position (first one named counts)."""
    found = parse(generated)
    return {k: found[k] == truth[k] for k in ("color", "shape", "position")}
