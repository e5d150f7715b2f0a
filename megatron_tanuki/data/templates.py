"""Conversation templates as data, and one tokenization of a conversation with its loss mask.

Templates (``get(name)``; the inference engine uses the same names):
``tanuki`` (alias ``alpaca``): Tanuki's Japanese Alpaca SFT format -- preamble, then per turn
    "\\n\\n### 指示:\\n{user}\\n\\n### 応答:\\n" and "{answer}</s>"; a leading system message replaces the
    preamble.
``llava-v1`` (alias ``v1``, LLaVA-JP stage 2): system prompt + " ", then "ユーザー: {user} " and
    "システム: {answer}</s>"; the first turn's ``<image>`` moves to its front ("<image>\\n...").
``plain`` (LLaVA-JP stage 1): ``<image>`` + caption + "\\n".
``none``: the turns' texts as they are (a base model's raw prompt).
``nemotron4`` (Nemotron-4 Instruct, as NeMo writes it): "<extra_id_0>System\\n{system}\\n", then per
    turn "<extra_id_1>User\\n{user}\\n<extra_id_1>Assistant\\n" and "{answer}\\n"; a leading system
    message fills {system}, else it stays empty ("<extra_id_0>System\\n\\n<extra_id_1>User\\n...").
    No ``<s>`` (NeMo sends Nemotron prompts with add_BOS off) and no ``</s>``: a generation ends at
    the next turn's "<extra_id_1>", the first of the template's stop strings (``Template.stop``).

Why one text: encoding segment by segment lets SentencePiece add its dummy prefix ``▁`` at every
boundary ("### 応答:\\n東京" is ['\\n', '東京'] jointly, ['\\n', '▁東京'] piecewise), so training would
see ids inference never produces. The rendered conversation is tokenized once, split only at
``<image>`` (the image placeholder id goes between the pieces, each piece with its own dummy prefix:
LLaVA-JP's tokenizer_image_token), and the loss mask comes from character offsets:

- Trained characters: each answer with what closes it ("</s>", or plain's "\\n"); for llava-v1 also
  the space after "システム:". SentencePiece starts a word at its space, so the answer's first token
  is "▁赤" (space included); LLaVA-JP's ``instruction_len - 2`` trains that same token.
- nemotron4 closes an answer with "\\n" *and* the next turn's "<extra_id_1>", both trained (after
  the last answer too, where the training text ends with it): that marker is the model's end of
  answer, so it must learn to write it (NeMo's chat SFT likewise leaves the next turn's start token
  unmasked as the end-of-turn signal). The data puts each "<extra_id_1>" at the end of the segment
  before it (system, user or answer): the text is NeMo's, and the marker after an answer is trained.
- A token is trained iff its first character is (a token straddling the end of an answer would stay
  trained; with these templates none does: "</s>", "\\n" and "<extra_id_1>" are single pieces, and
  every template's prompt ends in "\\n" or before a space, where SentencePiece starts a new token).
- ``</s>`` is written in the text (LLaVA-JP's sep2, the Tanuki chat format's end of answer) and must
  encode to the end-of-sequence id: the shipped SentencePiece model holds it as a user-defined piece
  (id 2), a tokenizer.json as an added token; a tokenizer that splits it into pieces is refused by
  name. A literal "</s>" inside a message also becomes the eos id, as with the HF tokenizer.
  Likewise nemotron4's closing "<extra_id_1>" must be one piece (data/tokenizer.py makes Nemotron's
  control pieces textual); a tokenizer without it (the Tanuki one) is refused by name.

``prompt_ids`` renders a conversation up to where the next answer starts and tokenizes it the same
way, so its ids are exactly the training ids before the answer's first trained token (for llava-v1
the prompt ends at "システム:"; the model writes the space as part of its first token).
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGE_MARK = "<image>"
EOS_MARK = "</s>"
IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100
ALPACA_PREAMBLE = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。"
V1_SYSTEM = "これは好奇心旺盛なユーザーと人工知能システムのチャットです。システムはユーザーの質問に親切、詳細、丁寧に答える。"


@dataclass(frozen=True)
class Template:
    name: str
    system: str = ""  # preamble (not trained)
    system_sep: str = ""  # after the preamble
    user: str = "{}"  # a user turn; "{}" is its text (not trained)
    head: str = ""  # before each answer (not trained); a generation prompt ends here
    answer: str = "{}"  # an answer and what closes it (trained)
    images: bool = True  # "<image>" marks an image position (else it is plain text)
    image_first: bool = False  # LLaVA-JP moves the first turn's <image> to its front
    system_turn: bool = False  # a leading ("system", text) turn replaces ``system``
    caption: bool = False  # plain: exactly one <image> turn (its text dropped) and one caption
    system_format: str = "{}"  # wraps the system text ("{}" is it); then ``system_sep``
    bos: bool = True  # the text starts with <s> (training and generation prompts alike)
    stop: tuple[str, ...] = ()  # default stop strings of a generation with this template


TANUKI = Template("tanuki", ALPACA_PREAMBLE, user="\n\n### 指示:\n{}\n\n### 応答:\n", answer="{}" + EOS_MARK,
                  images=False, system_turn=True)
V1 = Template("llava-v1", V1_SYSTEM, " ", user="ユーザー: {} ", head="システム:", answer=" {}" + EOS_MARK,
              image_first=True)
PLAIN = Template("plain", answer="{}\n", caption=True)
NONE = Template("none")
NEMOTRON_TURN = "<extra_id_1>"  # starts every turn after the system one; ends an answer
NEMOTRON4 = Template("nemotron4", system_format="<extra_id_0>System\n{}\n" + NEMOTRON_TURN,
                     user="User\n{}\n" + NEMOTRON_TURN, head="Assistant\n", answer="{}\n" + NEMOTRON_TURN,
                     images=False, system_turn=True, bos=False,
                     # "\n<extra_id_1>" first: an answer is cut before the newline that ends its turn
                     stop=("\n" + NEMOTRON_TURN, NEMOTRON_TURN, "<|endoftext|>", "\x11"))
TEMPLATES = {t.name: t for t in (TANUKI, V1, PLAIN, NONE, NEMOTRON4)} | {"alpaca": TANUKI, "v1": V1}


class ConversationError(ValueError):
    pass


def get(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def message_turns(messages, where: str) -> list[tuple[str, str]]:
    """[(role, text)] of a JSON ``messages`` list; its shape is checked here, its roles by ``render``."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 and isinstance(m.get("role"), str) for m in messages):
        raise ConversationError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects")
    return [(m["role"], m["content"]) for m in messages]


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


def render(template: Template, turns: list[tuple[str, str]], sample: str = "sample", unit: str = "turn",
           prompt: bool = False) -> list[tuple[str, bool]]:
    """[(text, trained)] segments whose concatenation is the conversation's one text.

    ``turns``: [(role, text)], roles 'user'/'assistant' (and a leading 'system' where the template
    allows one). ``prompt``: the turns end with a user turn and the text stops where the answer starts.
    """
    system = template.system
    if template.system_turn and turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
        if not turns:
            raise ConversationError(f"{sample}: conversation has only a system message")
    check_turns(turns, sample, unit)
    if prompt and turns[-1][0] != "user":
        raise ConversationError(f"{sample}: a generation prompt must end with a user {unit}")
    if template.caption and (len(turns) != (1 if prompt else 2) or IMAGE_MARK not in turns[0][1]):
        raise ConversationError(f"{sample}: plain template needs one <image> turn and one caption")
    segments = [(template.system_format.format(system) + template.system_sep, False)]
    for i, (role, text) in enumerate(turns):
        if role == "user":
            if template.caption:
                text = IMAGE_MARK
            elif i == 0 and template.image_first and IMAGE_MARK in text:
                text = IMAGE_MARK + "\n" + text.replace(IMAGE_MARK, "").strip()
            segments.append((template.user.format(text), False))
        else:
            segments += [(template.head, False), (template.answer.format(text), True)]
    if prompt:
        segments.append((template.head, False))
    return [(text, trained) for text, trained in segments if text]


def encode_text(tok, text: str, images: bool = True, bos: bool = True):
    """(ids, spans): ``text`` tokenized once, split only at ``<image>`` (-> IMAGE_TOKEN_ID).

    ``spans``: each token's (start, end) characters in ``text``; None for ``<s>``.
    """
    ids, spans = ([tok.bos_id], [None]) if bos else ([], [])
    pos = 0
    for k, piece in enumerate(text.split(IMAGE_MARK) if images else [text]):
        if k:
            ids.append(IMAGE_TOKEN_ID)
            spans.append((pos, pos + len(IMAGE_MARK)))
            pos += len(IMAGE_MARK)
        if piece:
            piece_ids, piece_spans = tok.encode_with_offsets(piece)
            ids += piece_ids
            spans += [(pos + a, pos + b) for a, b in piece_spans]
        pos += len(piece)
    return ids, spans


def tokenize_with_image(tok, text: str, bos: bool) -> list[int]:
    """``encode_text(...)[0]`` with ``tok.encode`` alone (LLaVA-JP's tokenizer_image_token).

    Generation prompts and ``convert verify`` need no offsets, so any tokenizer with encode() works.
    """
    pieces = text.split(IMAGE_MARK)
    ids = tok.encode(pieces[0], bos=bos)
    for piece in pieces[1:]:
        ids.append(IMAGE_TOKEN_ID)
        ids += tok.encode(piece) if piece else []
    return ids


def _check_close(tok, template: Template, ids, spans, segments, sample: str) -> None:
    """Every answer-closing "</s>" must be one token, the eos id; an answer-closing stop string of the
    template ("<extra_id_1>") must be one token (see the module docstring)."""
    token_at = {s[0]: (i, s[1]) for i, s in zip(ids, spans) if s is not None}
    pos = 0
    for seg, trained in segments:
        pos += len(seg)
        if not trained:
            continue
        if seg.endswith(EOS_MARK):
            at = pos - len(EOS_MARK)
            if token_at.get(at) != (tok.eos_id, pos):
                raise ValueError(f"{getattr(tok, 'model_file', tok)}: the text {EOS_MARK!r} that closes each answer "
                                 f"does not encode to the end-of-sequence id {tok.eos_id} ({sample})")
            continue
        mark = next((m for m in sorted(template.stop, key=len) if m and seg.endswith(m)), None)
        if mark is not None and token_at.get(pos - len(mark), (None, None))[1] != pos:
            raise ValueError(f"{getattr(tok, 'model_file', tok)}: the text {mark!r} that closes each answer of "
                             f"the {template.name} template is not one token ({sample})")


def tokenize(tok, template: Template, turns, sample: str = "sample", num_images: int | None = None,
             unit: str = "turn"):
    """(ids, labels): labels are the ids where trained, IGNORE_INDEX elsewhere (and on the image).

    ``ids == encode_text(tok, rendered text)[0]``: one tokenization of the whole conversation.
    ``num_images``: how many images the record has; the text's ``<image>`` markers must match it
    (LLaVA-JP would silently merge two markers of one turn into one, or crash later on a missing
    image feature).
    """
    if num_images is not None:
        marks = sum(text.count(IMAGE_MARK) for _, text in turns)
        if marks != num_images:
            raise ConversationError(f"{sample}: {marks} {IMAGE_MARK} marker(s) in the text but "
                                    f"{num_images} image(s)")
    segments = render(template, turns, sample, unit)
    text = "".join(seg for seg, _ in segments)
    trained = [t for seg, t in segments for _ in seg]
    ids, spans = encode_text(tok, text, template.images, bos=template.bos)
    _check_close(tok, template, ids, spans, segments, sample)
    labels = [i if s is not None and i != IMAGE_TOKEN_ID and trained[min(s[0], len(text) - 1)] else IGNORE_INDEX
              for i, s in zip(ids, spans)]
    return ids, labels


def prompt_ids(tok, template: str | Template, turns) -> list[int]:
    """Ids that ask the model for the answer to the last user turn (with ``<s>`` where the template
    has it; images unexpanded).

    Rendered and tokenized as in training, so these are exactly the training ids that come before
    the answer's first trained token. Expand images with ``expand_image_tokens``.
    """
    template = get(template) if isinstance(template, str) else template
    text = "".join(seg for seg, _ in render(template, turns, "prompt", prompt=True))
    if template.images:
        return tokenize_with_image(tok, text, bos=template.bos)
    return tok.encode(text, bos=template.bos)


def expand_image_tokens(ids: list[int], labels: list[int] | None, num_image_tokens: int):
    """Each IMAGE_TOKEN_ID becomes ``num_image_tokens`` of them; their labels are ignored.

    Done on the data side so a sample's length (packing, pipeline shapes) is known before any image
    is decoded.
    """
    out_ids, out_labels = [], []
    for i, t in enumerate(ids):
        if t == IMAGE_TOKEN_ID:
            out_ids += [IMAGE_TOKEN_ID] * num_image_tokens
            out_labels += [IGNORE_INDEX] * num_image_tokens
        else:
            out_ids.append(t)
            out_labels.append(labels[i] if labels is not None else t)
    return out_ids, out_labels
