"""Nemotron-4's chat template and the tokenizer support it needs: NeMo's exact strings, the
``<extra_id_*>`` markers as single ids whether the SentencePiece model holds them as user-defined or
control pieces, decoded text that shows them (stop strings cut there), and the Tanuki paths unchanged."""
import pytest
import sentencepiece as spm

from megatron_tanuki.data import templates
from megatron_tanuki.data.templates import IGNORE_INDEX, NEMOTRON4, prompt_ids, render, tokenize
from megatron_tanuki.data.tokenizer import TanukiTokenizer, load_tokenizer
from tests.unit.tiny_spm import EXTRA_IDS, make_nemotron_spm

E0, E1 = "<extra_id_0>", "<extra_id_1>"
ONE = [("user", "日本の首都は？"), ("assistant", "東京です。")]
TWO = ONE + [("user", "人口は？"), ("assistant", "約1400万人です。")]
SYSTEM = [("system", "あなたは誠実なアシスタントです。")] + TWO


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"user": path, "control": path}: the same tiny model, markers user-defined or control."""
    return {kind: make_nemotron_spm(tmp_path_factory.mktemp(kind), control=kind == "control")
            for kind in ("user", "control")}


@pytest.fixture(scope="module", params=["user", "control"])
def tok(request, models):
    return load_tokenizer(models[request.param])


def _text(turns, **kw):
    return "".join(t for t, _ in render(NEMOTRON4, turns, **kw))


def test_helper_model_has_nemotron_ids(models):
    for kind, path in models.items():
        sp = spm.SentencePieceProcessor(model_file=path)
        assert sp.get_piece_size() <= 256
        assert [sp.id_to_piece(i) for i in range(8)] == ["<unk>", "<pad>", "<s>", "</s>", *EXTRA_IDS, "\n"]
        assert [sp.is_control(i) for i in (4, 5, 6)] == [kind == "control"] * 3


def test_template_fields():
    assert templates.get("nemotron4") is NEMOTRON4
    assert NEMOTRON4.stop == ("\n<extra_id_1>", "<extra_id_1>", "<|endoftext|>", "\x11")
    assert (NEMOTRON4.images, NEMOTRON4.bos) == (False, False)
    for name in ("tanuki", "llava-v1", "plain", "none"):
        assert templates.get(name).stop == () and templates.get(name).bos


def test_renders_nemos_strings():
    assert _text(ONE[:1], prompt=True) == f"{E0}System\n\n{E1}User\n日本の首都は？\n{E1}Assistant\n"
    assert _text(ONE) == f"{E0}System\n\n{E1}User\n日本の首都は？\n{E1}Assistant\n東京です。\n{E1}"
    assert _text(TWO[:3], prompt=True) == (f"{E0}System\n\n{E1}User\n日本の首都は？\n{E1}Assistant\n東京です。\n"
                                           f"{E1}User\n人口は？\n{E1}Assistant\n")
    assert _text(SYSTEM) == (f"{E0}System\nあなたは誠実なアシスタントです。\n{E1}User\n日本の首都は？\n{E1}Assistant\n"
                             f"東京です。\n{E1}User\n人口は？\n{E1}Assistant\n約1400万人です。\n{E1}")


def test_only_a_leading_system_message_is_taken():
    with pytest.raises(templates.ConversationError, match="q.jsonl:4: unknown role 'system' in turn 2"):
        render(NEMOTRON4, TWO[:2] + [("system", "x"), ("user", "y")], "q.jsonl:4")


@pytest.mark.parametrize("turns", [ONE[:1], TWO[:3], SYSTEM[:4]], ids=["1-turn", "2-turn", "system"])
def test_prompt_ids_are_the_strings_ids_with_single_marker_ids(tok, models, turns):
    text = _text(turns, prompt=True)
    ids = prompt_ids(tok, "nemotron4", turns)
    # the reference: SentencePiece itself on the model whose markers are user-defined pieces
    assert ids == spm.SentencePieceProcessor(model_file=models["user"]).encode(text)
    markers = [i for i in ids if i in (4, 5, 6)]
    users = sum(role == "user" for role, _ in turns)
    assert markers == [4] + [5, 5] * users  # one id per "<extra_id_*>" in the text
    assert 2 not in ids  # no <s>: NeMo sends Nemotron prompts without it
    assert tok.decode(ids) == text


def test_offsets_of_a_marker_are_its_characters(tok):
    text = f"東京です。\n{E1}User"
    ids, spans = tok.encode_with_offsets(text)
    k = ids.index(5)
    assert spans[k] == (6, 6 + len(E1)) and text[slice(*spans[k])] == E1
    assert ids == tok.encode(text)


def test_answers_train_through_the_next_turn_marker(tok):
    ids, labels = tokenize(tok, NEMOTRON4, SYSTEM)
    assert ids == tok.encode(_text(SYSTEM))
    runs, run = [], []
    for t, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == t
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    assert [tok.decode(r) for r in runs] == [f"東京です。\n{E1}", f"約1400万人です。\n{E1}"]
    for k, turns in ((0, SYSTEM[:2]), (1, SYSTEM[:4])):  # each prompt is the training prefix of its answer
        p = prompt_ids(tok, NEMOTRON4, turns)
        assert ids[:len(p)] == p and labels[len(p)] != IGNORE_INDEX and labels[len(p) - 1] == IGNORE_INDEX


def test_generated_marker_is_seen_and_cut_by_the_stop_strings(tok):
    from megatron_tanuki.inference.engine import _stop_cut

    generated = tok.encode(f"東京です。\n{E1}User\n")
    assert tok.decode(generated) == f"東京です。\n{E1}User\n"
    assert _stop_cut(tok, generated, NEMOTRON4.stop) == (generated.index(5) + 1, "東京です。")


def test_model_without_pad_pads_with_eos(tmp_path):
    tok = TanukiTokenizer(make_nemotron_spm(tmp_path, control=True, pad=False))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 3)
    assert tok.textual_ids == [1, 4, 5]  # <extra_id_0> took id 1
    assert tok.decode([2, tok.sp.piece_to_id(E1), 3]) == E1


def test_load_tokenizer_takes_a_folder_with_a_sentencepiece_file(models, tmp_path):
    import os

    tok = load_tokenizer(os.path.dirname(models["control"]))
    assert isinstance(tok, TanukiTokenizer) and tok.encode(E1) == [tok.sp.piece_to_id("\u2581"), 5]  # dummy prefix
    with pytest.raises(FileNotFoundError, match=f"no tokenizer.json or tokenizer.model in {tmp_path}"):
        load_tokenizer(str(tmp_path))


def test_the_tanuki_tokenizer_is_refused_by_name():
    with pytest.raises(ValueError, match="tanuki-tokenizer.model: the text '<extra_id_1>' that closes each answer "
                                         r"of the nemotron4 template is not one token \(q.jsonl:3\)"):
        tokenize(TanukiTokenizer(), NEMOTRON4, ONE, "q.jsonl:3")


# Recorded with the code before the Nemotron-4 change: the Tanuki paths must not move.
TANUKI_CONV = [("system", "あなたは誠実なアシスタントです。"), ("user", "日本の首都は？<extra_id_1>"),
               ("assistant", "東京です。</s>"), ("user", "人口は？\n<image>"), ("assistant", "約1400万人です。")]
TANUKI_IDS = [1, 272, 894, 276, 3544, 382, 286, 14985, 298, 270, 8, 8, 48979, 272, 3994, 327, 8, 392, 271, 6173,
              276, 329, 2676, 31009, 318, 2157, 318, 279, 1109, 8, 8, 48979, 272, 1045, 2850, 327, 8, 992, 298, 270,
              2, 2, 8, 8, 48979, 272, 3994, 327, 8, 295, 537, 276, 329, 8, 2676, 7050, 1109, 8, 8, 48979, 272, 1045,
              2850, 327, 8, 698, 279, 311, 280, 280, 3215, 298, 270, 2]
TANUKI_TRAINED = {37: 992, 38: 298, 39: 270, 40: 2, 41: 2, 65: 698, 66: 279, 67: 311, 68: 280, 69: 280, 70: 3215,
                  71: 298, 72: 270, 73: 2}
V1_IDS = [1, 272, 581, 9469, 471, 243, 164, 199, 2966, 286, 3266, 278, 5359, 9431, 1633, 271, 10298, 298, 270, 1633,
          276, 3266, 271, 1335, 274, 7008, 269, 3327, 269, 2218, 3118, 274, 1302, 291, 270, 26753, 327, 2147, 271,
          6173, 276, 329, 2676, 31009, 318, 2157, 318, 279, 1109, 272, 1633, 327, 6180, 298, 270, 2]


def test_tanuki_outputs_are_unchanged():
    tok = TanukiTokenizer()
    assert tok.textual_ids == []  # its specials are user-defined pieces: nothing is rebuilt
    ids, labels = tokenize(tok, templates.TANUKI, TANUKI_CONV)
    assert ids == TANUKI_IDS
    assert {i: t for i, t in enumerate(labels) if t != IGNORE_INDEX} == TANUKI_TRAINED
    assert prompt_ids(tok, "tanuki", TANUKI_CONV[:4]) == TANUKI_IDS[:65]
    ids, labels = tokenize(tok, templates.V1, [TANUKI_CONV[1], ("assistant", "東京です。")])
    assert ids == V1_IDS and [t for t in labels if t != IGNORE_INDEX] == [6180, 298, 270, 2]
    # "<extra_id_1>" is plain text to the Tanuki model, as before
    assert tok.encode_with_offsets("a<extra_id_1>b") == (
        [355, 2676, 31009, 318, 2157, 318, 279, 1109, 1452],
        [(0, 1), (1, 2), (2, 7), (7, 8), (8, 10), (10, 11), (11, 12), (12, 13), (13, 14)])
