"""SentencePiece tokenizers: the real Tanuki model (65000 pieces; models pad the vocab to 65024) and
any other ``.model`` file (Nemotron-4's), plus HF ``tokenizer.json`` folders.

The Tanuki model file ships inside the package (data/assets), so nothing is downloaded. Its special
pieces are ordinary pieces in the SentencePiece model (``bos_id()`` is -1 there), so we look them
up by name: ``<s>``=1, ``</s>``=2, ``<pad>``=3, ``<EOD>``=6 -- the ids the released HF tokenizer
uses. Nemotron's model names them too (``<s>``=2, ``</s>``=3); a model without ``<pad>`` pads with
``</s>``.

Chat markers such as Nemotron's ``<extra_id_1>`` must be text on both sides: a template writes them
in its text (they must encode to their one id) and stop strings look for them in decoded text.
SentencePiece does that for *user-defined* pieces, but a *control* piece is neither parsed from text
nor decoded (it decodes to ""). So every control piece other than bos/eos/pad/unk is turned into a
user-defined one, in memory, when the model is loaded: SentencePiece then matches it as one piece
wherever its text occurs, reports its characters as its offsets and decodes it back, exactly as a
model trained with it user-defined. All such control pieces, not only ``<extra_id_N>``: a model's
other control pieces are its markers and sentinels, which HF's converted tokenizers treat as special
text too. bos/eos/pad stay control pieces (``<s>`` written in a message
stays plain text, and decode drops them). The Tanuki model has no control pieces at all (its
specials are user-defined already), so it loads and behaves exactly as before, with no extra cost
per call: the change is made once, to the model, never on the encode/decode path.
"""
from __future__ import annotations

import os
from functools import cached_property

import sentencepiece as spm

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
DEFAULT_MODEL = os.path.join(ASSETS, "tanuki-tokenizer.model")
PADDED_VOCAB = 65024
NAMED_SPECIALS = ("<s>", "</s>", "<pad>", "<unk>")


def textual_controls(sp: spm.SentencePieceProcessor) -> list[int]:
    """Ids of the control pieces that should read and print as text: all but bos/eos/pad/unk
    (by SentencePiece's own ids and by name)."""
    keep = {sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()} | {sp.piece_to_id(p) for p in NAMED_SPECIALS}
    return [i for i in range(sp.get_piece_size()) if sp.is_control(i) and i not in keep]


def _with_user_defined(sp: spm.SentencePieceProcessor, ids: list[int]) -> spm.SentencePieceProcessor:
    """The same model with the pieces ``ids`` user-defined instead of control (ids unchanged)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2  # needs protobuf (tensorboard's dependency)

    proto = model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    for i in ids:
        proto.pieces[i].type = model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


class TanukiTokenizer:
    """Any SentencePiece ``.model`` (the shipped Tanuki one by default) behind encode/decode/special ids."""

    def __init__(self, model_file: str = DEFAULT_MODEL):
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"tokenizer model not found: {model_file}")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.textual_ids = textual_controls(self.sp)  # control pieces read and printed as text
        if self.textual_ids:
            self.sp = _with_user_defined(self.sp, self.textual_ids)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _piece(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != "<unk>":
            raise KeyError(f"{self.model_file} has no piece {piece!r}")
        return i

    @cached_property
    def bos_id(self) -> int:
        return self._piece("<s>")

    @cached_property
    def eos_id(self) -> int:
        return self._piece("</s>")

    @cached_property
    def pad_id(self) -> int:
        """``<pad>``, or ``</s>`` for a model without one (Nemotron-style models need no pad piece)."""
        try:
            return self._piece("<pad>")
        except KeyError:
            return self.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode(text)`` and each token's (start, end) *character* span in ``text``.

        Loss masks are derived from these spans (data/templates.py). SentencePiece reports byte spans
        of the original text (NFKC-normalized pieces keep their source span); a dummy-prefix ``▁`` or
        the leading bytes of a byte-fallback character have an empty span at the next character.
        """
        encode = getattr(self.sp, "EncodeAsProto", None) or self.sp.encode_as_immutable_proto
        pieces = encode(text).pieces
        char_at = [0] * (len(text.encode("utf-8")) + 1)  # byte offset -> character offset
        b = 0
        for i, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            char_at[b:b + n] = [i] * n
            b += n
        char_at[b] = len(text)
        return [p.id for p in pieces], [(char_at[p.begin], char_at[p.end]) for p in pieces]

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of ``ids``; padded-vocab ids (>= vocab_size) and, by default, <s> </s> <pad> dropped.

        Chat markers (``<extra_id_1>``) are printed, so stop strings can see them."""
        special = {self.bos_id, self.eos_id, self.pad_id} if skip_special else set()
        return self.sp.decode([int(i) for i in ids if int(i) < self.vocab_size and int(i) not in special])


class HFTokenizer:
    """A HF ``tokenizer.json`` folder behind the same small interface (encode/decode/special ids)."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        self.model_file = path
        self.tk = Tokenizer.from_file(path)
        self.vocab_size = self.tk.get_vocab_size()
        ids = {t: self.tk.token_to_id(t) for t in ("<s>", "</s>", "<pad>")}
        missing = [t for t, i in ids.items() if i is None and t != "<pad>"]
        if missing:
            raise KeyError(f"{path} has no token {missing[0]!r}")
        self.bos_id, self.eos_id = ids["<s>"], ids["</s>"]
        self.pad_id = ids["<pad>"] if ids["<pad>"] is not None else self.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode(text)`` and each token's (start, end) character span in ``text``."""
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids, skip_special: bool = True) -> str:
        special = {self.bos_id, self.eos_id, self.pad_id} if skip_special else set()
        return self.tk.decode([int(i) for i in ids if int(i) not in special], skip_special_tokens=False)


def load_tokenizer(path: str | None = None):
    """None: the shipped Tanuki model; a ``.model`` file: SentencePiece; a folder: its tokenizer.json,
    else its tokenizer.model (a converted NeMo checkpoint carries the SentencePiece file)."""
    if path is None:
        return TanukiTokenizer()
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer(path)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return TanukiTokenizer(os.path.join(path, "tokenizer.model"))
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
    return TanukiTokenizer(path)
