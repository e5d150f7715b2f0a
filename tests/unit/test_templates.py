"""LLaVA-JP templates: exact strings, image placement, loss masks, and named errors."""
import pytest

from megatron_tanuki.data.templates import (
    IGNORE_INDEX, IMAGE_TOKEN_ID, PLAIN, V1, ConversationError, render, tokenize)
from megatron_tanuki.data.tokenizer import TanukiTokenizer

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
