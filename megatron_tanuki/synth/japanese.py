"""The Japanese check of `tanuki synth filter`: how Japanese each turn is, and English translation tails.

Why no language-ID model: a conversation's turns are long, mostly one script, and the failure we look
for is specific -- a teacher (Nemotron-4-340B-Instruct above all) answering in English, or answering in
Japanese and then adding an English translation of what it wrote. Counting characters finds both,
needs no download, and explains its verdict with a number.

- **Share**: per turn, the Japanese letters (hiragana, katakana incl. halfwidth, kanji and the
  iteration marks 々〆〻) over all letters (Unicode category L*): digits, punctuation, spaces and symbols
  are ignored, so "x + 3 = 5 のとき x は 2" counts its two x's against its eight kana/kanji and
  nothing else. Code (``` fenced blocks and `inline spans`) is left out: a coding answer is judged
  by its explanation, not by its identifiers. A turn without letters ("42", only code) has no share
  (``None``) and never fails. Chinese hanzi count as kanji (a character count cannot tell them apart).
- **Translation tail**: what the seed team's cleanup regexes (yuta0x89/nedo_project_code,
  ota/topic-hub/filter_sft.py) removed, found instead of deleted: a parenthesised translation
  ("(Translation: ...)", "(English translation ...)", "（翻訳：...）", "(訳: ...)", "(英語訳：...)",
  "(Traducción: ...)"), a paragraph that opens with "Translation:" / "Topic description translation:" /
  "Note: The translation", and -- the case no regex list catches -- English paragraphs at the end of a
  turn after Japanese ones: trailing paragraphs (blank-line separated, outside ``` code fences) whose
  share is below ``tail_share`` and that read as English prose (two or more distinct English function
  words: code seldom has them), after a head whose share is at least ``min_share``.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# (first, last) code points of Japanese letters; only characters of category L* are counted at all
JAPANESE_RANGES = (
    (0x3005, 0x3006),    # 々 〆
    (0x303B, 0x303B),    # 〻
    (0x3041, 0x309F),    # hiragana (ゝゞゟ included)
    (0x30A0, 0x30FF),    # katakana (ー ヽヾ included; ・ is punctuation and not counted)
    (0x31F0, 0x31FF),    # katakana phonetic extensions
    (0x3400, 0x4DBF),    # CJK extension A
    (0x4E00, 0x9FFF),    # CJK unified ideographs
    (0xF900, 0xFAFF),    # CJK compatibility ideographs
    (0xFF66, 0xFF9F),    # halfwidth katakana
    (0x20000, 0x3134F),  # CJK extensions B-G
)
LAST_CODE_POINT = 0x3134F  # letters beyond it (none in use) are not counted

# Parenthesised translations and translation paragraphs the seed team's regexes removed.
MARKERS = re.compile(
    r"[(（]\s?(?:[Tt]ranslat(?:ion|ing|ed|es)\b|English translation|[Aa]nswer in English\s?[：:]"
    r"|[Tt]raduc(?:tion|ción)|[Tt]raduzione|(?:英語翻|ヒントの|翻)?訳\s?[：:]|英語訳\s?[：:]|回答を英語に翻訳すると)"
    r"|(?:^|\n)\s?(?:[Tt]ranslation\s?[：:]|Topic description translation\s?[：:]|Note: The translation)")

# English function words: prose has several, code and formulas seldom any.
ENGLISH_WORDS = frozenset(
    "the an is are was were be been of to in on for with and or that this it as by at from which "
    "answer problem question translation".split())
WORD = re.compile(r"[A-Za-z]+")
PARAGRAPH_BREAK = re.compile(r"\n[ \t\u3000]*\n")
FENCE = "```"
CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.S)  # fenced blocks (an unclosed one runs to the end), spans


@dataclass(frozen=True)
class LangConfig:
    """``filters.lang`` of a recipe."""
    min_share: float = 0.5               # a turn below this Japanese share drops the row
    tail_share: float = 0.1              # a trailing paragraph below this share may be a translation tail
    drop_translation_tail: bool = True   # False: record the tails, keep the rows


def is_japanese(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in JAPANESE_RANGES)


@functools.cache
def _strippers() -> tuple[re.Pattern, re.Pattern]:
    """Patterns that remove every non-letter, and every letter that is not Japanese: counting by
    regex substitution runs in C (a per-character Python loop was the filter's bottleneck). Built once
    from the code points up to the last CJK extension (~0.1 s)."""
    def char_class(flags) -> str:
        ranges, start = [], None
        for cp, inside in enumerate(flags + [False]):
            if inside and start is None:
                start = cp
            elif not inside and start is not None:
                ranges.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
                start = None
        return "".join(ranges)

    letter = [chr(cp).isalpha() for cp in range(LAST_CODE_POINT + 1)]  # isalpha: category L*
    japanese = [False] * len(letter)
    for lo, hi in JAPANESE_RANGES:
        japanese[lo:hi + 1] = letter[lo:hi + 1]
    return re.compile(f"[^{char_class(letter)}]+"), re.compile(f"[^{char_class(japanese)}]+")


def japanese_share(text: str) -> float | None:
    """Japanese letters / letters outside code (``` blocks, `spans`); None when there are none."""
    not_letter, not_japanese = _strippers()
    letters = not_letter.sub("", CODE.sub(" ", text))
    if not letters:
        return None
    return len(not_japanese.sub("", letters)) / len(letters)


def _english_prose(paragraph: str, tail_share: float) -> bool:
    share = japanese_share(paragraph)
    if share is None or share >= tail_share or FENCE in paragraph:
        return False
    return len({w.lower() for w in WORD.findall(paragraph)} & ENGLISH_WORDS) >= 2


def _outside_fences(text: str) -> list[str]:
    """The text's paragraphs, with every paragraph of a ``` fenced block merged into one that holds
    the fence (so code is never judged as prose)."""
    out, open_fence = [], False
    for part in PARAGRAPH_BREAK.split(text.strip()):
        if open_fence:
            out[-1] += "\n\n" + part
        else:
            out.append(part)
        if part.count(FENCE) % 2:
            open_fence = not open_fence
    return out


def has_translation_tail(text: str, config: LangConfig = LangConfig()) -> bool:
    if MARKERS.search(CODE.sub(" ", text)):
        return True
    paragraphs = _outside_fences(text)
    k = len(paragraphs)
    while k > 0 and _english_prose(paragraphs[k - 1], config.tail_share):
        k -= 1
    if k in (0, len(paragraphs)):  # no English tail, or nothing but English (that is not_japanese's case)
        return False
    head = japanese_share("\n\n".join(paragraphs[:k]))
    return head is not None and head >= config.min_share


def check(messages: list[dict], config: LangConfig = LangConfig()) -> tuple[dict, list[str]]:
    """(the row's ``filters.lang`` record, its drop reasons) for a conversation. Turn k is
    ``messages[k]`` (0-based: turn 0 is Q1, turn 1 is A1, ...)."""
    shares, tails, reasons = [], [], []
    for k, m in enumerate(messages):
        text = m.get("content") or ""
        share = japanese_share(text)
        shares.append(None if share is None else round(share, 4))
        if share is not None and share < config.min_share:
            reasons.append(f"not_japanese turn {k} (share {share:.2f} < {config.min_share:g})")
        if has_translation_tail(text, config):
            tails.append(k)
            if config.drop_translation_tail:
                reasons.append(f"translation_tail turn {k}")
    return {"japanese_share": shares, "translation_tail": tails}, reasons
