"""`tanuki synth export` (megatron_tanuki.synth.export): a synth output folder as a Hugging Face dataset.

The OUT folders are written here in the contract's shape (two data shards, a torn last line, rejects,
a filtered/ folder with keep flags and its summary); the export is read back with
``datasets.load_from_disk`` and compared field by field, and its README.md is checked for the recipe
text, the counts and the attribution. A failing row leaves no DEST; an empty OUT is an error naming it.
"""
import hashlib
import json
import os
import shutil

import datasets
import pytest
import yaml

from megatron_tanuki.synth.export import ExportError, export_hf_dataset

RECIPE_HEAD = "# recipe persona_math_test hash 0123456789abcdef\n"
RECIPE_BODY = """name: persona_math_test
description: ペルソナ x 算数 (export test)
count: 8
teacher:
  name: nemotron4-340b-instruct
  chat: nemotron4
seeds:
  persona: {source: personas.jsonl}
  task: {source: tasks.jsonl}
turns:
  - name: q1
    role: user
    prompt:
      - {role: user, content: "Create a {task} problem for {persona}. 簡潔に日本語で回答してください。"}
"""


def record(i: int, **extra) -> dict:
    cid = hashlib.sha256(f"0123456789abcdef:{i}".encode()).hexdigest()[:16]
    stop = [] if i % 2 else ["<extra_id_1>"]  # an empty list in some turns: why sampling is JSON text
    return {"id": cid, "index": i,
            "messages": [{"role": "user", "content": f"問題: りんごが{i}個あります。"},
                         {"role": "assistant", "content": f"答えは{i}個です。"},
                         {"role": "user", "content": "もし2個食べたら？"},
                         {"role": "assistant", "content": f"{i - 2}個です。"}],
            "persona": f"CMディレクター{i}", "task": "算数", "teacher": "nemotron4-340b-instruct",
            "recipe": {"name": "persona_math_test", "hash": "0123456789abcdef"},
            "sampling": {t: {"temperature": 0.7, "top_p": 1.0, "max_tokens": 512, "stop": stop}
                         for t in ("q1", "a1", "q2", "a2")},
            "seed": 1000 + i, "finish_reasons": ["stop", "stop", "length", "stop"],
            "created": f"2026-11-29T09:00:{i:02d}Z", **extra}


def write_jsonl(path, rows, torn: str = "") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.write(torn)


def make_out(folder, data: dict[str, list], rejects: int = 0):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "recipe.yaml"), "w", encoding="utf-8") as f:
        f.write(RECIPE_HEAD + RECIPE_BODY)
    for name, rows in data.items():
        write_jsonl(os.path.join(folder, "data", name), rows,
                    torn='{"id": "deadbeefdeadbeef", "index": 99, "mess' if name.endswith("00001.jsonl") else "")
    write_jsonl(os.path.join(folder, "rejects", "shard-00000-of-00002.jsonl"),
                [{"id": f"{k:016x}", "index": 50 + k, "turn": "q1", "reason": "no match of require",
                  "attempts": 4, "messages": []} for k in range(rejects)])
    return str(folder)


def as_record(row: dict) -> dict:
    """A loaded row in the record's own shape (sampling back from its JSON text)."""
    return {**row, "sampling": json.loads(row["sampling"])}


def card(dest) -> tuple[dict, str]:
    text = open(os.path.join(dest, "README.md"), encoding="utf-8").read()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Records 0-3 in shard 0 of 2, records 4-6 (+ a torn line) in shard 1 of 2, 2 rejects."""
    base = tmp_path_factory.mktemp("synth_out")
    recs = [record(i) for i in range(7)]
    path = make_out(base / "out", {"shard-00001-of-00002.jsonl": recs[4:], "shard-00000-of-00002.jsonl": recs[:4]},
                    rejects=2)
    return {"dir": path, "records": recs, "base": base}


def test_export_loads_every_record_with_its_fields_and_a_card(out):
    dest = os.path.join(out["base"], "hf", "persona_math")
    r = export_hf_dataset(out["dir"], dest)
    ds = datasets.load_from_disk(dest)
    assert isinstance(ds, datasets.Dataset)
    assert [as_record(row) for row in ds] == out["records"]  # file names sorted, torn line skipped
    assert ds.features["messages"] == datasets.List({"role": datasets.Value("string"),
                                                     "content": datasets.Value("string")})
    assert ds.features["recipe"] == {"name": datasets.Value("string"), "hash": datasets.Value("string")}
    assert ds.features["index"] == datasets.Value("int64")
    assert ds.features["sampling"] == datasets.Value("string")
    assert ds.features["finish_reasons"] == datasets.List(datasets.Value("string"))
    assert r == {"rows": 7, "filtered_out": 0, "rejected": 2, "source": os.path.join(out["dir"], "data"),
                 "filtered": False, "include_rejected": False, "json_columns": ["sampling"], "dest": dest}
    front, body = card(dest)
    assert front == {"license": "apache-2.0", "language": ["ja"], "task_categories": ["text-generation"],
                     "size_categories": ["n<1K"], "pretty_name": "persona_math_test",
                     "tags": ["synthetic", "multi-turn", "tanuki-synth"]}
    assert "```yaml\n" + RECIPE_HEAD + RECIPE_BODY + "```\n" in body  # the recipe verbatim
    assert "ペルソナ x 算数 (export test)" in body
    assert "| recipe hash | `0123456789abcdef` |" in body and "| teacher | nemotron4-340b-instruct |" in body
    assert "| rows | 7 |" in body and "not in the rows) | 2 |" in body and "filtered out" not in body
    assert "[yuta0x89/nedo_project_code](https://github.com/yuta0x89/nedo_project_code)" in body
    assert "`team_hatakeyama_phase2`" in body and "Apache-2.0" in body
    assert "check the teacher's license" in body
    assert sorted(os.listdir(os.path.dirname(dest))) == ["persona_math"]  # no work folder left beside it


def test_filtered_export_keeps_the_kept_rows(out, tmp_path):
    src = shutil.copytree(out["dir"], tmp_path / "out")
    # the shape filters.py writes: the record + filters (per step), keep, drop_reasons
    recs = [record(i, filters={"dedup": {"jaccard": None}, "lang": {"japanese_share": [0.9, 0.8]}}, keep=i % 3 != 1,
                   drop_reasons=[] if i % 3 != 1 else ["near_duplicate_of x"]) for i in range(7)]
    write_jsonl(os.path.join(src, "filtered", "data.jsonl"), recs, torn='{"id": "x", "keep": tr')
    summary = {"rows": 7, "kept": 5, "dropped": 2, "dropped_by_reason": {"near_duplicate_of": 2}}
    with open(os.path.join(src, "filtered", "summary.json"), "w") as f:
        json.dump(summary, f)
    dest = tmp_path / "kept"
    r = export_hf_dataset(str(src), str(dest))
    ds = datasets.load_from_disk(str(dest))
    kept = [rec for rec in recs if rec["keep"]]
    assert [rec["index"] for rec in kept] == [0, 2, 3, 5, 6]
    assert [{**as_record(row), "filters": json.loads(row["filters"])} for row in ds] == kept
    assert ds.features["keep"] == datasets.Value("bool")
    assert ds.features["drop_reasons"] == datasets.List(datasets.Value("string"))
    assert (r["rows"], r["filtered_out"], r["rejected"], r["json_columns"]) == (5, 2, 2, ["filters", "sampling"])
    _, body = card(dest)
    assert "| filtered out by `tanuki synth filter` | 2 |\n| &nbsp;&nbsp;filtered out: near_duplicate_of | 2 |" in body
    assert json.dumps(summary, indent=1) in body
    # include_rejected: the dropped rows too, told apart by their keep column
    every = export_hf_dataset(str(src), str(tmp_path / "all"), include_rejected=True)
    ds = datasets.load_from_disk(str(tmp_path / "all"))
    assert [row["keep"] for row in ds] == [rec["keep"] for rec in recs]
    assert (every["rows"], every["filtered_out"]) == (7, 2)
    # a run that went on after the filter: the filtered rows are stale
    with open(os.path.join(src, "data", "shard-00000-of-00002.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record(7), ensure_ascii=False) + "\n")
    with pytest.raises(ExportError, match=rf"^{src}/filtered: filtered 7 rows, but data/ holds 8 now: run "
                                          r"`tanuki synth filter` again before using its rows$"):
        export_hf_dataset(str(src), str(tmp_path / "stale"))
    assert not (tmp_path / "stale").exists()


def test_a_failed_export_leaves_no_dest(out, tmp_path):
    bad = record(3, messages="問題: not a list")
    src = make_out(tmp_path / "out", {"shard-00000-of-00001.jsonl": [record(0), record(1), record(2), bad]})
    dest = tmp_path / "exports" / "ds"
    with pytest.raises(ExportError) as e:
        export_hf_dataset(src, str(dest))
    data = os.path.join(src, "data", "shard-00000-of-00001.jsonl")
    assert str(e.value).startswith(f"{data}:4: messages: expected a list of {{role, content}} strings (as the "
                                   "earlier rows), got ")
    assert os.listdir(tmp_path / "exports") == []  # neither DEST nor the work folder
    # a kill leaves only a work folder, which the next export to that DEST removes
    stale = tmp_path / "exports" / ".ds.tmp-999999999"
    (stale / "dataset").mkdir(parents=True)
    export_hf_dataset(out["dir"], str(dest))
    assert os.listdir(tmp_path / "exports") == ["ds"]
    # an existing DEST is refused, or replaced whole with overwrite
    (dest / "extra.txt").write_text("old")
    with pytest.raises(ExportError, match=rf"^{dest}: exists \(--overwrite replaces it\)$"):
        export_hf_dataset(out["dir"], str(dest))
    assert export_hf_dataset(out["dir"], str(dest), overwrite=True)["rows"] == 7
    assert not (dest / "extra.txt").exists() and len(datasets.load_from_disk(str(dest))) == 7
    assert os.listdir(tmp_path / "exports") == ["ds"]


def test_a_folder_without_data_is_an_error_naming_it(tmp_path):
    empty = make_out(tmp_path / "empty", {})
    with pytest.raises(ExportError, match=rf"^{empty}: no conversations to export \(no data/\*\.jsonl; "):
        export_hf_dataset(empty, str(tmp_path / "d1"))
    torn = make_out(tmp_path / "torn", {"shard-00000-of-00001.jsonl": []})  # only a torn line
    with open(os.path.join(torn, "data", "shard-00000-of-00001.jsonl"), "w") as f:
        f.write('{"id": "abc", "ind')
    with pytest.raises(ExportError, match=rf"^{torn}: no conversations to export \({torn}/data/\*\.jsonl holds no "
                                          r"records\)$"):
        export_hf_dataset(torn, str(tmp_path / "d2"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ExportError, match=r"plain: no recipe.yaml -- not a `tanuki synth run` output folder$"):
        export_hf_dataset(str(tmp_path / "plain"), str(tmp_path / "d3"))
    with pytest.raises(ExportError, match=r"include_rejected keeps the rows `tanuki synth filter` dropped"):
        export_hf_dataset(make_out(tmp_path / "ok", {"shard-00000-of-00001.jsonl": [record(0)]}),
                          str(tmp_path / "d4"), include_rejected=True)
    assert sorted(os.listdir(tmp_path)) == ["empty", "ok", "plain", "torn"]
