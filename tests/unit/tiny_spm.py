"""A tiny SentencePiece model laid out like Nemotron-4's tokenizer, trained in the test's own folder.

Nemotron's special ids: ``<s>``=2, ``</s>``=3; here also ``<unk>``=0, ``<pad>``=1,
``<extra_id_0>``..``<extra_id_2>`` = 4..6 and ``"\\n"`` = 7, a piece of its own as in the Tanuki model,
so the chat template's newlines survive (``pad=False`` leaves ``<pad>`` out: ``<extra_id_0>`` takes
id 1, the others keep theirs). The ``<extra_id_*>`` pieces are user-defined by default, control pieces
with ``control=True`` (SentencePiece itself neither parses nor decodes those; our tokenizer must).
Fewer than 256 pieces, so it also drives a model whose vocab is 256. Trained from generated
Japanese/English lines (nothing downloaded) in well under a second.
"""
from __future__ import annotations

import io
import os
import random

import sentencepiece as spm

EXTRA_IDS = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")
VOCAB = 240

_EN = ("System User Assistant you are a helpful model answer the question what is the capital of Japan "
       "Tokyo it has about fourteen million people write short poem red circle blue square on left "
       "top count to three yes no please thank").split()
_JA = ("日本 の 首都 は 東京 です 。 人口 約 万人 あなた 誠実 な アシスタント 赤い 円 が 左上 に あります "
       "青い 四角 何 色 ？ ください 答え て はい いいえ").split()


def _lines(n: int = 400) -> list[str]:
    rng = random.Random(0)
    lines = []
    for i in range(n):
        words = _EN if i % 2 else _JA
        sep = " " if i % 2 else ""
        lines.append(sep.join(rng.choice(words) for _ in range(rng.randint(4, 12))) + f" {i % 1000}")
    return lines + [" ".join(_EN), "".join(_JA), "0123456789 ,.:;!?-'\"()"]


def make_nemotron_spm(folder, control: bool = False, pad: bool = True) -> str:
    """Train the model into ``folder``; returns the path of its ``tokenizer.model``."""
    model = io.BytesIO()
    if control:
        kinds = dict(control_symbols=list(EXTRA_IDS), user_defined_symbols=["\n"])
    else:
        kinds = dict(user_defined_symbols=list(EXTRA_IDS) + ["\n"])
    ids = dict(unk_id=0, pad_id=1 if pad else -1, bos_id=2, eos_id=3)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines()), model_writer=model, vocab_size=VOCAB, model_type="unigram",
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        num_threads=1, minloglevel=2, **ids, **kinds)
    path = os.path.join(str(folder), "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path
