"""Record -> training sample: token ids, next-token targets (masked where not trained), images.

Chat SFT uses Tanuki's Japanese Alpaca format (``tanuki``); LLaVA records use LLaVA-JP's ``plain`` /
``v1`` (data/templates.py renders and tokenizes each conversation once, as inference does). Each
``<image>`` is expanded to the model's image positions here, so a sample's length is known before
any image is decoded (packing and pipeline shapes need it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_tanuki.data import templates
from megatron_tanuki.data.templates import ALPACA_PREAMBLE, IGNORE_INDEX, ConversationError, expand_image_tokens

__all__ = ["ALPACA_PREAMBLE", "Sample", "SampleBuilder", "SampleError", "alpaca"]
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class SampleError(ValueError):
    """A record that cannot become a sample; ``kind`` is the counter it goes to."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Sample:
    inputs: list[int]  # ids[:-1]
    targets: list[int]  # ids[1:], IGNORE_INDEX where there is no loss
    images: list[str]  # image paths, in reading order
    where: str

    def __len__(self) -> int:
        return len(self.inputs)


def _shifted(ids: list[int], labels: list[int], images, where) -> Sample:
    return Sample(ids[:-1], labels[1:], images, where)


def alpaca(tok, messages: list[tuple[str, str]], where: str):
    """Tanuki's SFT format; ``</s>`` after every answer; loss on the answers and their ``</s>``.

    A leading system message replaces the preamble (templates.TANUKI).
    """
    ids, labels = templates.tokenize(tok, templates.TANUKI, messages, where, unit="message")
    if messages[-1][0] != "assistant":
        raise ConversationError(f"{where}: the last message must be the assistant's answer")
    return ids, labels


class SampleBuilder:
    def __init__(self, fmt: str, template: str | None, tok, seq_length: int, image_folder: str | None = None,
                 num_image_tokens: int = 0):
        self.fmt, self.tok, self.seq_length = fmt, tok, seq_length
        self.template = templates.get(template) if fmt == "llava" else None
        self.image_folder, self.num_image_tokens = image_folder, num_image_tokens

    def __call__(self, rec: dict, where: str) -> Sample:
        if self.fmt == "text":
            text = rec.get("text")
            if not isinstance(text, str) or not text:
                raise SampleError("empty text", f"{where}: no non-empty \"text\" field")
            ids = self.tok.encode(text, bos=True, eos=True)
            return _shifted(ids, ids, [], where)
        if self.fmt == "chat":
            msgs = rec.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise SampleError("empty conversation", f"{where}: empty conversation (no \"messages\")")
            try:
                turns = [(m["role"], m["content"]) for m in msgs]
            except (KeyError, TypeError):
                raise SampleError("bad message", f"{where}: each message needs \"role\" and \"content\"") from None
            ids, labels = self._conversation(lambda: alpaca(self.tok, turns, where))
            return self._checked(_shifted(ids, labels, [], where))
        return self._llava(rec, where)

    def _conversation(self, fn):
        try:
            return fn()
        except ConversationError as e:
            msg = str(e)
            kind = ("unknown role" if "unknown role" in msg else "empty conversation" if "empty" in msg
                    else "bad conversation")
            raise SampleError(kind, msg) from None

    def _llava(self, rec: dict, where: str) -> Sample:
        convs = rec.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise SampleError("empty conversation", f"{where}: empty conversation (no \"conversations\")")
        turns = []
        for i, c in enumerate(convs):
            role = c.get("from") if isinstance(c, dict) else None
            if role not in LLAVA_ROLES:
                raise SampleError("unknown role", f"{where}: unknown role {role!r} in turn {i}")
            turns.append((LLAVA_ROLES[role], str(c.get("value", ""))))
        images = []
        if rec.get("image"):
            names = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
            for name in names:
                path = os.path.join(self.image_folder or "", name)
                if not os.path.isfile(path):
                    raise SampleError("missing image", f"{where}: image file not found: {path}")
                images.append(path)
        ids, labels = self._conversation(
            lambda: templates.tokenize(self.tok, self.template, turns, where, num_images=len(images)))
        ids, labels = expand_image_tokens(ids, labels, self.num_image_tokens)
        return self._checked(_shifted(ids, labels, images, where))

    def _checked(self, s: Sample) -> Sample:
        if len(s) > self.seq_length:
            raise SampleError("over-long sample", f"{s.where}: {len(s) + 1} tokens (image positions included), "
                                                  f"more than data.seq_length={self.seq_length} + 1")
        if all(t == IGNORE_INDEX for t in s.targets):
            raise SampleError("nothing to learn", f"{s.where}: no trained tokens")
        return s
