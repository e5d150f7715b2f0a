"""Conversation templates: exact strings, image placement, one tokenization per conversation, loss
masks from character offsets, generation prompts equal to the training prefix, and named errors."""
import os

import pytest

from megatron_tanuki.data import templates
from megatron_tanuki.data.templates import (
    IGNORE_INDEX, IMAGE_TOKEN_ID, NONE, PLAIN, TANUKI, V1, ConversationError, expand_image_tokens, prompt_ids,
    render, tokenize)
from megatron_tanuki.data.tokenizer import HFTokenizer, TanukiTokenizer

TOK = TanukiTokenizer()


def test_v1_renders_the_seed_prompt():
    turns = [("user", "これは何ですか？\n<image>"), ("assistant", "赤い円です。"), ("user", "色は？"), ("assistant", "赤")]
    text = "".join(t for t, _ in render(V1, turns))
    assert text == (V1.system + " ユーザー: <image>\nこれは何ですか？ システム: 赤い円です。</s>"
                    "ユーザー: 色は？ システム: 赤</s>")


def test_v1_loss_only_on_answers_and_their_end():
    turns = [("user", "<image>\n何がありますか？"), ("assistant", "赤い円が左上にあります。")]
    ids, labels = tokenize(TOK, V1, turns)
    assert ids[0] == TOK.bos_id and ids.count(IMAGE_TOKEN_ID) == 1
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert TOK.decode(trained, skip_special=False).replace(" ", "") == "赤い円が左上にあります。</s>"
    assert trained[-1] == TOK.eos_id
    assert labels[ids.index(IMAGE_TOKEN_ID)] == IGNORE_INDEX


def test_plain_is_image_then_caption_newline():
    ids, labels = tokenize(TOK, PLAIN, [("user", "<image>"), ("assistant", "青い四角")])
    assert ids[:2] == [TOK.bos_id, IMAGE_TOKEN_ID]
    assert labels[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert TOK.decode(ids[2:]) == "青い四角\n"
    assert labels[2:] == ids[2:]


@pytest.mark.parametrize("turns,message", [
    ([], "empty conversation"),
    ([("human", "x"), ("assistant", "y")], "unknown role 'human' in turn 0"),
    ([("assistant", "y")], "turn 0 should be from user, got assistant"),
])
def test_bad_conversations_are_named(turns, message):
    with pytest.raises(ConversationError, match=f"data.json:12: {message}"):
        tokenize(TOK, V1, turns, sample="data.json:12")


@pytest.mark.parametrize("turns,images,message", [
    ([("user", "<image>と<image>を比べて"), ("assistant", "同じです")], 1, "2 <image> marker"),
    ([("user", "何色？"), ("assistant", "赤")], 1, "0 <image> marker"),
    ([("user", "<image>何色？"), ("assistant", "赤")], 0, "1 <image> marker"),
])
def test_image_markers_must_match_the_images(turns, images, message):
    with pytest.raises(ConversationError, match=f"llava.json:3: {message}\\(s\\) in the text but {images} image"):
        tokenize(TOK, V1, turns, sample="llava.json:3", num_images=images)
    ids, _ = tokenize(TOK, V1, [("user", "<image>何色？"), ("assistant", "赤")], num_images=1)
    assert ids.count(IMAGE_TOKEN_ID) == 1


ALPACA = [("user", "日本の首都は？"), ("assistant", "東京です。"), ("user", "人口は？"), ("assistant", "約1400万人です。")]
LLAVA = [("user", "何がありますか？\n<image>"), ("assistant", "赤い円が左上にあります。"), ("user", "色は？"),
         ("assistant", "あかです")]


def _text(template, turns, **kw):
    return "".join(t for t, _ in render(template, turns, **kw))


def _trained_runs(ids, labels):
    """The trained tokens, as text, one string per run of consecutive trained positions."""
    runs, prev = [], False
    for i, (t, label) in enumerate(zip(ids, labels)):
        if label != IGNORE_INDEX:
            assert label == t
            piece = TOK.sp.id_to_piece(t).replace("\u2581", " ")
            runs[-1:] = [runs[-1] + piece] if prev else runs[-1:] + [piece]
        prev = label != IGNORE_INDEX
    return runs


def test_segmentwise_encoding_would_add_a_space_at_the_answer():
    """The measured cause (issue 9, finding 6): the dummy prefix at a segment start is a ``▁``."""
    joint = TOK.encode("### 応答:\n東京です。")
    piecewise = TOK.encode("### 応答:\n") + TOK.encode("東京です。")
    assert [TOK.sp.id_to_piece(i) for i in joint[-4:]] == ["\n", "東京", "です", "。"]
    assert [TOK.sp.id_to_piece(i) for i in piecewise[-4:]] == ["\n", "\u2581東京", "です", "。"]
    ids, labels = tokenize(TOK, TANUKI, ALPACA[:2])
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert ids[first - 1:first + 1] == [TOK.sp.piece_to_id("\n"), TOK.sp.piece_to_id("東京")]


def test_tanuki_multi_turn_is_one_encoding_of_the_rendered_text():
    text = _text(TANUKI, ALPACA)
    assert text == (templates.ALPACA_PREAMBLE + "\n\n### 指示:\n日本の首都は？\n\n### 応答:\n東京です。</s>"
                    "\n\n### 指示:\n人口は？\n\n### 応答:\n約1400万人です。</s>")
    ids, labels = tokenize(TOK, TANUKI, ALPACA)
    assert ids == TOK.encode(text, bos=True)
    assert ids.count(TOK.eos_id) == 2  # "</s>" in the text is the eos id, not pieces
    assert _trained_runs(ids, labels) == ["東京です。</s>", "約1400万人です。</s>"]
    assert labels[-1] == TOK.eos_id


def test_a_system_message_replaces_the_preamble():
    turns = [("system", "あなたは猫です。")] + ALPACA[:2]
    text = _text(TANUKI, turns)
    assert text.startswith("あなたは猫です。\n\n### 指示:\n日本の首都は？")
    assert tokenize(TOK, TANUKI, turns)[0] == TOK.encode(text, bos=True)


def test_v1_with_image_is_one_encoding_split_only_at_the_image():
    text = _text(V1, LLAVA)
    assert text == (V1.system + " ユーザー: <image>\n何がありますか？ システム: 赤い円が左上にあります。</s>"
                    "ユーザー: 色は？ システム: あかです</s>")
    before, after = text.split("<image>")
    ids, labels = tokenize(TOK, V1, LLAVA, num_images=1)
    assert ids == TOK.encode(before, bos=True) + [IMAGE_TOKEN_ID] + TOK.encode(after)
    # the space after "システム:" is the answer's: SentencePiece puts it into the first answer token
    assert _trained_runs(ids, labels) == [" 赤い円が左上にあります。</s>", " あかです</s>"]
    assert TOK.sp.id_to_piece(ids[labels.index(TOK.sp.piece_to_id("\u2581赤"))]) == "\u2581赤"


def test_v1_without_image_is_one_encoding():
    turns = [("user", "色は？"), ("assistant", "赤です")]
    ids, labels = tokenize(TOK, V1, turns)
    assert ids == TOK.encode(_text(V1, turns), bos=True)
    assert _trained_runs(ids, labels) == [" 赤です</s>"]


def test_a_token_across_the_answer_start_goes_with_its_first_character():
    """``none`` adds nothing between turns, so "東" + "京です" share the token "▁東京" (untrained)."""
    ids, labels = tokenize(TOK, NONE, [("user", "東"), ("assistant", "京です")])
    assert ids == TOK.encode("東京です", bos=True) == [TOK.bos_id, TOK.sp.piece_to_id("\u2581東京"),
                                                      TOK.sp.piece_to_id("です")]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, TOK.sp.piece_to_id("です")]


@pytest.mark.parametrize("name,turns,ends", [
    ("tanuki", ALPACA[:2], "### 応答:\n"),
    ("tanuki", ALPACA, "### 応答:\n"),
    ("tanuki", [("system", "あなたは猫です。"), ("user", "こんにちは"), ("assistant", "にゃー")], "### 応答:\n"),
    ("llava-v1", LLAVA[:2], "システム:"),
    ("llava-v1", LLAVA, "システム:"),
    ("v1", [("user", "<image>これは何？"), ("assistant", "猫")], "システム:"),
    ("plain", [("user", "<image>"), ("assistant", "青い四角")], "<image>"),
])
def test_prompt_ids_are_the_training_ids_before_the_answer(name, turns, ends):
    """What inference feeds for the last user turn = what training fed before that answer's first token."""
    template = templates.get(name)
    ids, labels = tokenize(TOK, template, turns)
    start = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX)
    assert prompt_ids(TOK, name, turns[:-1]) == ids[:start]
    assert _text(template, turns[:-1], prompt=True).endswith(ends)


def test_a_prompt_must_end_with_a_user_turn():
    with pytest.raises(ConversationError, match="prompt: a generation prompt must end with a user turn"):
        prompt_ids(TOK, "tanuki", ALPACA[:2])


def test_unknown_template_is_named():
    with pytest.raises(ValueError, match="unknown conversation template 'chatml'; known: alpaca, llava-v1, nemotron4, none, "
                                         "plain, tanuki, v1"):
        templates.get("chatml")


def _char_tokenizer(folder, text, eos_is_special):
    """A real tokenizer.json, one token per character; "</s>" an added token or not."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(set(text)):
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if eos_is_special:
        tk.add_special_tokens(["<s>", "</s>"])
    os.makedirs(folder, exist_ok=True)
    tk.save(os.path.join(folder, "tokenizer.json"))
    return HFTokenizer(folder)


def test_a_tokenizer_json_follows_the_same_rules(tmp_path):
    tok = _char_tokenizer(str(tmp_path / "ok"), _text(TANUKI, ALPACA), eos_is_special=True)
    ids, labels = tokenize(tok, TANUKI, ALPACA)
    assert ids == tok.encode(_text(TANUKI, ALPACA), bos=True)
    assert "".join(tok.tk.id_to_token(t) for t in labels if t != IGNORE_INDEX) == "東京です。</s>約1400万人です。</s>"


def test_a_tokenizer_that_splits_the_eos_text_is_refused(tmp_path):
    tok = _char_tokenizer(str(tmp_path / "bad"), _text(TANUKI, ALPACA), eos_is_special=False)
    with pytest.raises(ValueError, match=f"{tmp_path / 'bad' / 'tokenizer.json'}: the text '</s>' that closes each "
                                         "answer does not encode to the end-of-sequence id 2 \\(chat.jsonl:4\\)"):
        tokenize(tok, TANUKI, ALPACA, sample="chat.jsonl:4")


def test_image_positions_expand_on_the_data_side():
    assert expand_image_tokens([1, 5, IMAGE_TOKEN_ID, 7], [IGNORE_INDEX, 5, IGNORE_INDEX, 7], 3) == (
        [1, 5, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 7], [IGNORE_INDEX, 5] + [IGNORE_INDEX] * 3 + [7])
    assert expand_image_tokens([IMAGE_TOKEN_ID, 9], None, 2) == ([IMAGE_TOKEN_ID] * 2 + [9], [IGNORE_INDEX] * 2 + [9])


def test_token_spans_are_characters_of_the_original_text():
    """NFKC-normalized pieces keep their source characters; byte-fallback bytes sit on their character."""
    text = "ab  東京です。</s>x？ｱ①\U0001F600 "
    ids, spans = TOK.encode_with_offsets(text)
    assert ids == TOK.encode(text)
    assert [(TOK.sp.id_to_piece(i), text[a:b]) for i, (a, b) in zip(ids, spans)] == [
        ("\u2581ab", "ab"), ("\u2581", " "), ("\u2581東京", " 東京"), ("です", "です"), ("。", "。"), ("</s>", "</s>"),
        ("x", "x"), ("?", "？"), ("ア", "ｱ"), ("1", "①"), ("<0xF0>", ""), ("<0x9F>", ""), ("<0x98>", ""),
        ("<0x80>", "\U0001F600"), ("\u2581", " ")]
    assert spans[10:14] == [(17, 17)] * 3 + [(17, 18)]
