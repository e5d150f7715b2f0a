"""Training data: formats, templates, bad records (named, counted, limited), packing, resumable order."""
import json

import pytest

from megatron_tanuki.train.batches import collate
from megatron_tanuki.data.records import BadRecords, RecordIndex, TooManyBadRecords
from megatron_tanuki.data.samples import ALPACA_PREAMBLE, SampleBuilder
from megatron_tanuki.data.stream import RowStream
from megatron_tanuki.data.templates import IGNORE_INDEX, IMAGE_TOKEN_ID, V1, expand_image_tokens, prompt_ids
from megatron_tanuki.data.tokenizer import TanukiTokenizer
from megatron_tanuki.demo.shapes import draw

TOK = TanukiTokenizer()


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _stream(paths, fmt, seq=64, template=None, pack=True, limit=100, image_folder=None, n_img=15, log=None):
    logs = []
    bad = BadRecords(limit, log=log or logs.append)
    build = SampleBuilder(fmt, template, TOK, seq, image_folder, n_img)
    return RowStream(RecordIndex(paths), build, seq, seed=3, pretrain=fmt == "text", pack=pack, bad=bad), bad, logs


def test_alpaca_format_and_loss_on_answers_only(tmp_path):
    msgs = [{"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"},
            {"role": "user", "content": "人口は？"}, {"role": "assistant", "content": "約1400万人です。"}]
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    build = SampleBuilder("chat", None, TOK, 256)
    s = build(RecordIndex([f]).read(0), "chat.jsonl:1")
    ids = [TOK.bos_id] + s.inputs[1:] + s.targets[-1:]
    text = TOK.decode(ids, skip_special=False)
    import unicodedata

    assert text.replace(" ", "") == unicodedata.normalize("NFKC", f"<s>{ALPACA_PREAMBLE}\n\n### 指示:\n日本の首都は？\n\n### 応答:\n東京です。</s>"
                                     f"\n\n### 指示:\n人口は？\n\n### 応答:\n約1400万人です。</s>").replace(" ", "")
    trained = [t for t in s.targets if t != IGNORE_INDEX]
    assert TOK.decode(trained, skip_special=False).replace(" ", "") == "東京です。</s>約1400万人です。</s>"
    # one encoding of the rendered conversation (what inference tokenizes), spaces and all
    rendered = (f"{ALPACA_PREAMBLE}\n\n### 指示:\n日本の首都は？\n\n### 応答:\n東京です。</s>"
                f"\n\n### 指示:\n人口は？\n\n### 応答:\n約1400万人です。</s>")
    assert s.inputs + s.targets[-1:] == TOK.encode(rendered, bos=True)
    prompt = prompt_ids(TOK, "tanuki", [(m["role"], m["content"]) for m in msgs[:1]])
    assert s.inputs[:len(prompt)] == prompt and s.targets[len(prompt) - 1] == TOK.sp.piece_to_id("東京")
    assert set(s.targets[:len(prompt) - 1]) == {IGNORE_INDEX}


def test_llava_v1_sample_is_one_encoding_with_expanded_images(tmp_path):
    import random

    (tmp_path / "img").mkdir()
    draw("赤い", "円", "左上", 112, random.Random(0)).save(tmp_path / "img" / "a.png")
    rec = {"image": "a.png", "conversations": [{"from": "human", "value": "何がありますか？\n<image>"},
                                               {"from": "gpt", "value": "赤い円です。"}]}
    f = _jsonl(tmp_path / "v1.jsonl", [rec])
    s = SampleBuilder("llava", "v1", TOK, 256, str(tmp_path / "img"), 15)(RecordIndex([f]).read(0), "v1.jsonl:1")
    before, after = (V1.system + " ユーザー: <image>\n何がありますか？ システム: 赤い円です。</s>").split("<image>")
    raw = TOK.encode(before, bos=True) + [IMAGE_TOKEN_ID] + TOK.encode(after)
    assert s.inputs + s.targets[-1:] == expand_image_tokens(raw, None, 15)[0]
    prompt, _ = expand_image_tokens(prompt_ids(TOK, "llava-v1", [("user", "何がありますか？\n<image>")]), None, 15)
    assert s.inputs[:len(prompt)] == prompt and s.images == [str(tmp_path / "img" / "a.png")]
    assert set(s.targets[:len(prompt) - 1]) == {IGNORE_INDEX} and s.targets[len(prompt) - 1] != IGNORE_INDEX


def test_packed_rows_keep_documents_apart(tmp_path):
    recs = [{"messages": [{"role": "user", "content": f"質問{i}"}, {"role": "assistant", "content": "答え" * (i % 3 + 1)}]}
            for i in range(12)]
    stream, _, _ = _stream([_jsonl(tmp_path / "c.jsonl", recs)], "chat", seq=96)
    rows = stream.next_rows(3)
    assert all(len(r) <= 96 for r in rows) and sum(len(r.where) for r in rows) >= 4
    assert any(len(r.where) > 1 for r in rows)
    lengths = [len(r) for r in rows]  # before padding
    b = collate(rows, 96, TOK.pad_id, None, BadRecords(10), packed=True)
    assert b.attention_mask is None and b.tokens.shape == (1, 3 * 96)  # one THD sequence, no [s, s] mask
    row = rows[0]
    for d in set(row.docs):
        idx = [i for i, x in enumerate(row.docs) if x == d]
        assert b.position_ids[0, idx].tolist() == list(range(len(idx)))  # positions restart per sample
    # cu_seqlens: every sample's start and end, each row's padding one segment, rows laid end to end
    want, offset = [0], 0
    for r, n in zip(rows, lengths):
        for d in sorted(set(r.docs[:n])):
            want.append(offset + max(i for i, x in enumerate(r.docs[:n]) if x == d) + 1)
        if n < 96:
            want.append(offset + 96)
        offset += 96
    assert b.packed_seq_params.cu_seqlens_q.tolist() == want
    assert b.loss_mask[0, lengths[0]:96].sum() == 0  # padding carries no loss


def test_order_is_seeded_resumable_and_layout_free(tmp_path):
    recs = [{"text": f"文書{i}番です。" * (1 + i % 4)} for i in range(40)]
    f = [_jsonl(tmp_path / "t.jsonl", recs)]
    a, _, _ = _stream(f, "text", seq=32)
    all_rows = [r.inputs for r in a.next_rows(12)]
    b, _, _ = _stream(f, "text", seq=32)
    first = [r.inputs for r in b.next_rows(5)]
    state = json.loads(json.dumps(b.state_dict()))  # what a checkpoint stores
    c, _, _ = _stream(f, "text", seq=32)
    c.load_state_dict(state)
    assert first + [r.inputs for r in c.next_rows(7)] == all_rows
    assert all(len(r) == 32 for r in all_rows)
    # pretraining rows are a cut token stream: the targets are the next inputs
    r = a.next_row()
    assert r.targets[:-1] == r.inputs[1:]


def _bad_llava(tmp_path):
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    import random

    draw("赤い", "円", "左上", 112, random.Random(0)).save(img_dir / "ok.png")
    (img_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    ok = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\n何？"}, {"from": "gpt", "value": "円"}]}
    recs = [
        ok,
        {"image": "missing.png", "conversations": ok["conversations"]},
        {"image": "corrupt.png", "conversations": ok["conversations"]},
        {"image": "ok.png", "conversations": []},
        {"image": "ok.png", "conversations": [{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\n" + "長い" * 200},
                                              {"from": "gpt", "value": "x"}]},
        {"image": "ok.png", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return str(path), str(img_dir)


def test_each_bad_record_kind_is_named_counted_and_skipped(tmp_path):
    path, img_dir = _bad_llava(tmp_path)
    stream, bad, logs = _stream([path], "llava", seq=128, template="v1", image_folder=img_dir)
    rows = [stream.next_row()]
    while stream.epoch == 0:  # one pass: every record is seen once
        rows.append(stream.next_row())
    image_bad = BadRecords(10, log=logs.append)
    batch = collate(rows, 128, TOK.pad_id, 112, image_bad, packed=True)
    reasons = dict(bad.reasons) | dict(image_bad.reasons)
    assert reasons == {"missing image": 1, "corrupt image": 1, "empty conversation": 1, "unknown role": 1,
                       "over-long sample": 1, "bad conversation": 1}
    text = "\n".join(logs)
    for i, what in ((1, "image file not found"), (2, "cannot decode image"), (3, "empty conversation"),
                    (4, "unknown role 'robot'"), (5, "more than data.seq_length=128"),
                    (6, "2 <image> marker(s) in the text but 1 image(s)")):
        assert f"llava.json[{i}]" in text and what in text, (i, what, text)
    # the corrupt sample is blanked (no loss, no image positions); the good ones keep their images
    n_images = batch.images.shape[0]
    assert int((batch.tokens == IMAGE_TOKEN_ID).sum()) == n_images * 15


def test_too_many_bad_records_stop_with_a_summary(tmp_path):
    path, img_dir = _bad_llava(tmp_path)
    stream, _, _ = _stream([path], "llava", seq=128, template="v1", image_folder=img_dir, limit=2)
    with pytest.raises(TooManyBadRecords, match=r"3 bad records, more than data.max_bad_records=2: .*missing image: 1 "
                                                r"\(first at .*llava.json\[1\]\)"):
        stream.next_rows(4)


def test_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "良い"}\n{not json\n\n[1, 2]\n{"text": ""}\n', encoding="utf-8")
    stream, bad, logs = _stream([str(f)], "text", seq=8)
    stream.next_rows(2)
    text = "\n".join(logs)
    assert f"{f}:2: invalid JSON" in text and f"{f}:4: expected a JSON object" in text
    assert f'{f}:5: no non-empty "text" field' in text
