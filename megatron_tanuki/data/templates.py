"""LLaVA-JP conversation templates as data, and their tokenization with loss masks.

``plain`` (VLM stage 1): ``<image>`` + caption + "\\n"; loss on the caption and the newline.
``v1`` (VLM stage 2): system prompt, then turns "ユーザー: ..." and "システム: ...", user turns ended
by " " and assistant turns by "</s>"; loss on the assistant answers and their "</s>" only.
Prompts are split at ``<image>`` and each piece tokenized separately (the first with <s>), with the
image placeholder id between the pieces -- the seed team's tokenizer_image_token.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGE_MARK = "<image>"
IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str


PLAIN = Template("plain", "", ("", ""), "\n", "\n")
V1 = Template(
    "v1",
    "これは好奇心旺盛なユーザーと人工知能システムのチャットです。システムはユーザーの質問に親切、詳細、丁寧に答える。",
    ("ユーザー", "システム"), " ", "</s>")
TEMPLATES = {t.name: t for t in (PLAIN, V1)}


class ConversationError(ValueError):
    pass


def tokenize_with_image(tok, text: str, bos: bool) -> list[int]:
    pieces = text.split(IMAGE_MARK)
    ids = tok.encode(pieces[0], bos=bos)
    for piece in pieces[1:]:
        ids.append(IMAGE_TOKEN_ID)
        ids += tok.encode(piece) if piece else []
    return ids


def check_turns(turns: list[tuple[str, str]], sample: str, unit: str = "turn") -> None:
    """Roles alternate user, assistant, user, ...; anything else is named (sample, index, role)."""
    if not turns:
        raise ConversationError(f"{sample}: empty conversation")
    for i, (role, _) in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if role not in ("user", "assistant"):
            raise ConversationError(f"{sample}: unknown role {role!r} in {unit} {i}")
        if role != want:
            raise ConversationError(f"{sample}: {unit} {i} should be from {want}, got {role}")


def render(template: Template, turns: list[tuple[str, str]], sample: str = "sample"):
    """``turns``: [(role, text)] with roles 'user'/'assistant'. Returns [(text, trained)] segments."""
    check_turns(turns, sample)
    if template is PLAIN:
        if len(turns) != 2 or IMAGE_MARK not in turns[0][1]:
            raise ConversationError(f"{sample}: plain template needs one <image> turn and one caption")
        return [(IMAGE_MARK, False), (turns[1][1] + template.sep, True)]
    segments = [(template.system + template.sep, False)]
    for i, (role, text) in enumerate(turns):
        if i == 0 and IMAGE_MARK in text:  # LLaVA-JP moves the image to the front of the first turn
            text = IMAGE_MARK + "\n" + text.replace(IMAGE_MARK, "").strip()
        if role == "user":
            segments.append((f"{template.roles[0]}: {text}{template.sep}", False))
        else:
            segments.append((f"{template.roles[1]}: ", False))
            segments.append((text + template.sep2, True))
    return segments


def tokenize(tok, template: Template, turns, sample: str = "sample", num_images: int | None = None):
    """(ids, labels): labels are the ids where trained, IGNORE_INDEX elsewhere (and on the image).

    ``num_images``: how many images the record has; the text's ``<image>`` markers must match it
    (LLaVA-JP would silently merge two markers of one turn into one, or crash later on a missing
    image feature).
    """
    if num_images is not None:
        marks = sum(text.count(IMAGE_MARK) for _, text in turns)
        if marks != num_images:
            raise ConversationError(f"{sample}: {marks} {IMAGE_MARK} marker(s) in the text but "
                                    f"{num_images} image(s)")
    ids, labels = [], []
    for i, (text, trained) in enumerate(render(template, turns, sample)):
        piece = tokenize_with_image(tok, text, bos=(i == 0))
        ids += piece
        labels += [t if trained and t != IMAGE_TOKEN_ID else IGNORE_INDEX for t in piece]
    return ids, labels
