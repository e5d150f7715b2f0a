"""`tanuki synth filter` (megatron_tanuki/synth/filters.py) on run outputs in the synth contract's shape.

- Dedup: an exact duplicate after normalization (fullwidth digits and letters, halfwidth katakana,
  spaces, case) and a near duplicate (one number changed in a long Q1) of Japanese problems are found
  across shard files, with the estimated Jaccard equal to datasketch's own estimate; distinct
  problems (one on the same template) are kept.
- The Japanese check on conversations in the shape of the seed team's Nemotron-4 outputs: a clean
  math Q/A, a "(Translation: ...)" tail, an English paragraph appended to a Japanese answer, an
  all-English conversation, a coding answer: exact shares and reasons. Variables, units, URLs and
  e-mail addresses do not count against a turn (an English sentence still fails); English quoted by a
  translation question is material, a Japanese "（訳: ...）" gloss is no tail; system messages are
  not turns (turn numbers as in ask_llm). An exact copy of a dropped near duplicate names the kept row.
- Ask-LLM's reuse stamp holds the tokenizer: another tokenizer discards saved scores.
- Ask-LLM through a checkpoint (`tanuki generate --score` in a subprocess, as the CLI runs it) equals
  a direct transformers forward of the same fp32 weights on the same prompt ids (abs 1e-5); a rerun
  with --keep-top reuses the scores; through a real `tanuki serve` (the URL path: top-20 log-probs)
  equals the same forward restricted to its top 20.
  The tiny model's lm_head rows of "yes"/"Yes" are set along the mean final hidden state of the
  prompts, so P(yes) is about 0.1-0.9 instead of ~1/65000: at 1e-5 the comparison means something,
  and the words are inside the server's top 20.
- Recipe errors: an unknown ``filters`` key (top level and nested), a bad value, a prompt naming an
  undefined variable, a yes word of two tokens: each names the file and the field.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import unicodedata

import pytest
import torch

from megatron_tanuki.synth import ask_llm as ask
from megatron_tanuki.synth.filters import FilterConfig, run_filter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
ENV = {**{k: v for k, v in os.environ.items()
          if k not in ("RANK", "SLURM_PROCID", "SLURM_STEP_ID", "TANUKI_DEBUG", "TANUKI_API_KEY")},
       "OMP_NUM_THREADS": "1", "TANUKI_PROGRESS": "0"}
ROLES = ("user", "assistant", "user", "assistant")


def row_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def record(name: str, index: int, turns: list[str]) -> dict:
    """A data record as `tanuki synth run` writes it."""
    return {"id": row_id(name), "index": index,
            "messages": [{"role": r, "content": t} for r, t in zip(ROLES, turns)],
            "task": "math", "persona": "CMディレクター", "teacher": "nemotron4-340b-instruct",
            "recipe": {"name": "persona_math_nemotron4", "hash": "0" * 16},
            "sampling": {s: {"temperature": 0.7, "top_p": 1.0, "max_tokens": 512, "stop": []}
                         for s in ("q1", "a1", "q2", "a2")},
            "seed": 1000 + index, "finish_reasons": ["stop"] * 4, "created": "2026-11-29T09:00:00Z"}


def write_run(out, shards: list[list[dict]], filters: dict | None = None) -> None:
    os.makedirs(out / "data")
    for i, rows in enumerate(shards):
        with open(out / "data" / f"shard-{i:05d}-of-{len(shards):05d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if filters is not None:
        import yaml

        text = yaml.safe_dump({"name": "persona_math_nemotron4", "filters": filters}, allow_unicode=True)
        (out / "recipe.yaml").write_text("# recipe hash 0000000000000000\n" + text, encoding="utf-8")


def results(out) -> tuple[dict, dict]:
    with open(out / "filtered" / "data.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    with open(out / "filtered" / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert sorted(os.listdir(out / "filtered")) in (["data.jsonl", "summary.json"],
                                                    ["ask_llm", "data.jsonl", "summary.json"])
    return {r["id"]: r for r in rows}, summary


# ------------------------------------------------------------------------------------ dedup

FLOUR = ("問題: 料理研究家の鈴木さんは、料理教室で使うために、1袋500グラム入りの小麦粉を7袋と、1袋300グラム入りの"
         "砂糖を4袋買いました。さらに、1本200ミリリットルの牛乳を6本用意しました。小麦粉と砂糖を合わせた重さは全部で"
         "何グラムですか？また、牛乳は全部で何ミリリットルですか？単位はgとmLを使い、答えだけでなく考え方も日本語で"
         "簡潔に説明してください。")
# the same after NFKC + no whitespace + lowercase: fullwidth digits and letters, halfwidth katakana, spaces
FLOUR_EXACT = (FLOUR.replace("500", "５００").replace("、", "、 ").replace("グラム入りの小麦粉", "ｸﾞﾗﾑ入りの小麦粉")
               .replace("gとmL", "ＧとＭＬ") + "\n")
FLOUR_NEAR = FLOUR.replace("小麦粉を7袋", "小麦粉を9袋")
FLOUR_OTHER = ("問題: 料理研究家の鈴木さんは、パン教室で使うために、1袋1キログラム入りの強力粉を3袋と、1個50グラムの"
               "バターを8個買いました。強力粉とバターを合わせた重さは全部で何グラムですか？")
CM = ("問題: CMディレクターの佐藤さんは、15秒のCMを4本と30秒のCMを3本撮影しました。"
      "撮影したCMの長さは合計で何秒ですか？")
ANSWER = ["答えは省略します。", "問題: 条件を変えるとどうなりますか？", "同じ考え方で求められます。"]


def normalized(text: str) -> str:
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text)).lower()


def minhash(text: str):
    from datasketch import MinHash

    norm = normalized(text)
    m = MinHash(num_perm=128, seed=1)
    m.update_batch([norm[i:i + 5].encode() for i in range(len(norm) - 4)])
    return m


def true_jaccard(a: str, b: str) -> float:
    sa, sb = ({normalized(t)[i:i + 5] for i in range(len(normalized(t)) - 4)} for t in (a, b))
    return len(sa & sb) / len(sa | sb)


def test_exact_and_near_duplicates_found_distinct_kept(tmp_path):
    assert normalized(FLOUR_EXACT) == normalized(FLOUR) and FLOUR_EXACT != FLOUR
    assert true_jaccard(FLOUR, FLOUR_NEAR) > 0.9 and true_jaccard(FLOUR, FLOUR_OTHER) < 0.5
    rows = {name: record(name, i, [q1, *ANSWER]) for i, (name, q1) in enumerate(
        [("flour", FLOUR), ("cm", CM), ("flour-near", FLOUR_NEAR), ("flour-exact", FLOUR_EXACT),
         ("flour-other", FLOUR_OTHER), ("cm-again", CM), ("flour-near-again", FLOUR_NEAR + " ")])}
    out = tmp_path / "run"
    write_run(out, [[rows["flour"], rows["cm"], rows["flour-near"]],
                    [rows["flour-exact"], rows["flour-other"], rows["cm-again"], rows["flour-near-again"]]])
    summary = run_filter(str(out), dedup=True, lang=None, ask_llm=None, progress=False)
    got, written = results(out)
    assert summary == written
    assert list(got) == [r["id"] for r in rows.values()]  # every row, in file order
    jaccard = minhash(FLOUR).jaccard(minhash(FLOUR_NEAR))
    assert 0.9 <= jaccard < 1

    def dedup(exact=None, near=None, j=None):
        return {"exact_duplicate_of": exact, "near_duplicate_of": near, "jaccard": j}

    flour, cm = row_id("flour"), row_id("cm")
    expected = {
        "flour": (dedup(), []),
        "cm": (dedup(), []),
        "flour-near": (dedup(near=flour, j=round(jaccard, 4)), [f"near_duplicate_of {flour}"]),
        "flour-exact": (dedup(exact=flour), [f"exact_duplicate_of {flour}"]),
        "flour-other": (dedup(), []),
        "cm-again": (dedup(exact=cm), [f"exact_duplicate_of {cm}"]),
        # an exact copy of a dropped near duplicate names the kept row, not the dropped one
        "flour-near-again": (dedup(exact=flour), [f"exact_duplicate_of {flour}"]),
    }
    for name, (rec, reasons) in expected.items():
        row = got[row_id(name)]
        assert row["filters"] == {"dedup": rec} and row["drop_reasons"] == reasons and row["keep"] == (not reasons)
        assert {k: v for k, v in row.items() if k not in ("filters", "keep", "drop_reasons")} == rows[name]
    assert {k: summary[k] for k in ("rows", "kept", "dropped", "dropped_by_reason", "steps", "inputs")} == {
        "rows": 7, "kept": 3, "dropped": 4, "dropped_by_reason": {"exact_duplicate": 3, "near_duplicate": 1},
        "steps": ["dedup"], "inputs": ["data/shard-00000-of-00002.jsonl", "data/shard-00001-of-00002.jsonl"]}
    assert summary["config"] == {"dedup": {"ngram": 5, "threshold": 0.9, "num_perm": 128}}


# ------------------------------------------------------------------------------------ Japanese

CLEAN = [  # letters: Q1 45 kana/kanji, A1 26, Q2 35, A2 23; "CM" (a 2-letter abbreviation) is not counted
    "問題: CMディレクターの佐藤さんは、15秒のCMを4本と30秒のCMを3本撮影しました。撮影したCMの長さは合計で何秒ですか？",
    "15秒のCMが4本で60秒、30秒のCMが3本で90秒です。合計は60秒＋90秒で150秒になります。",
    "問題: もし30秒のCMをさらに2本追加で撮影した場合、CMの長さの合計は何秒になりますか？",
    "追加の2本は30秒×2本で60秒です。合計は150秒＋60秒で210秒になります。",
]
TRANSLATION = [  # A1: 32 kana/kanji + 28 Latin (Translation The sales are yen yen)
    "問題: パン屋の田中さんは、1個120円のメロンパンを8個焼きました。全部売れたときの売り上げはいくらですか？",
    "メロンパン1個の値段は120円で、8個売れたので、売り上げは120円×8個で960円になります。\n\n"
    "(Translation: The sales are 120 yen × 8 = 960 yen.)",
    "問題: もしメロンパンの値段を1個150円に上げた場合、8個すべて売れたときの売り上げはいくらですか？",
    "1個150円で8個売れたので、売り上げは150円×8個で1200円になります。",
]
ENGLISH_PARAGRAPH = [  # A2: 14 kana/kanji + 56 Latin in the appended paragraph (62 less "If", "of", "is")
    "問題: 図書館司書の山本さんは、1段に25冊の本が並ぶ本棚を6段整理しました。整理した本は全部で何冊ですか？",
    "1段に25冊の本が6段あるので、25冊×6段で150冊になります。",
    "問題: もし1段に並ぶ本を30冊に増やした場合、6段で何冊になりますか？",
    "1段に30冊で6段なので、30冊×6段で180冊です。\n\n"
    "If each shelf holds 30 books and there are 6 shelves, the total number of books is 30 × 6 = 180.",
]
ENGLISH = [
    "Problem: A farmer has 12 rows of apple trees with 8 trees in each row. How many apple trees are there in total?",
    "There are 12 rows with 8 trees each, so the total is 12 × 8 = 96 trees.",
    "Problem: If the farmer plants 3 more rows with 8 trees each, how many trees will there be?",
    "The 3 new rows add 3 × 8 = 24 trees, so the total becomes 96 + 24 = 120 trees.",
]
CODE = [  # code blocks and `spans` are not judged; the prose around them is all Japanese
    "問題: リストの数の合計を返す関数をPythonで書いてください。",
    "次の関数はリストの合計を返します。\n\n```python\ndef total(xs):\n    \"\"\"Return the sum of the list.\"\"\"\n"
    "    return sum(xs)\n```\n\n`total([1, 2, 3])` は 6 を返します。",
    "問題: 空のリストを渡すとどうなりますか？",
    "```python\nprint(total([]))  # 0\n```",
]


def test_japanese_check_on_seed_team_samples(tmp_path):
    names = ("clean", "translation", "english-paragraph", "english", "code")
    convs = (CLEAN, TRANSLATION, ENGLISH_PARAGRAPH, ENGLISH, CODE)
    out = tmp_path / "run"
    write_run(out, [[record(n, i, c) for i, (n, c) in enumerate(zip(names, convs))]])
    summary = run_filter(str(out), dedup=False, lang="ja", ask_llm=None, progress=False)
    got, _ = results(out)
    expected = {
        "clean": ([1.0, 1.0, 1.0, 1.0], [], []),
        "translation": ([1.0, round(32 / 60, 4), 1.0, 1.0], [1], ["translation_tail turn 1"]),
        "english-paragraph": ([1.0, 1.0, 1.0, round(14 / 70, 4)], [3],
                              ["not_japanese turn 3 (share 0.20 < 0.5)", "translation_tail turn 3"]),
        "english": ([0.0] * 4, [], [f"not_japanese turn {k} (share 0.00 < 0.5)" for k in range(4)]),
        "code": ([round(24 / 30, 4), 1.0, 1.0, None], [], []),  # Q1: 24 kana/kanji + "Python"; A2 is only code
    }
    for name, (shares, tails, reasons) in expected.items():
        row = got[row_id(name)]
        assert row["filters"] == {"lang": {"japanese_share": shares, "translation_tail": tails}}, name
        assert (row["drop_reasons"], row["keep"]) == (reasons, not reasons), name
    assert {k: summary[k] for k in ("rows", "kept", "dropped", "dropped_by_reason")} == {
        "rows": 5, "kept": 2, "dropped": 3, "dropped_by_reason": {"not_japanese": 2, "translation_tail": 2}}


@pytest.mark.parametrize("text, tail", [
    ("答えは5個です。（翻訳：The answer is 5.）", True),
    ("答えは5個です。(訳: The answer is 5.)", True),
    ("答えは5個です。(英語訳：The answer is five apples.)", True),
    ("答えは5個です。\n\nTranslation:\n\nThe answer is 5.", True),
    ("問題: 次の英文を日本語に翻訳してください。「I have a pen.」", False),
    ("答えは5個です。\n\n```python\n# the answer is in the table of the translation\nprint(5)\n```", False),
    ("答えは5個です。\n\nx = 5, y = 3", False),  # a formula paragraph is not English prose
    ("この英文の和訳（訳: 猫が寝ている）を確認しましょう。", False),  # a Japanese gloss: no Latin inside
    ("答えは5個です。（訳：猫が5匹）\n\nこれで終わりです。", False),
])
def test_translation_markers(text, tail):
    from megatron_tanuki.synth.japanese import has_translation_tail

    assert has_translation_tail(text) is tail


def turns(*texts: str, roles=ROLES) -> list[dict]:
    return [{"role": r, "content": t} for r, t in zip(roles, texts)]


def test_share_leaves_out_variables_units_urls_and_addresses():
    from megatron_tanuki.synth.japanese import check, japanese_share

    assert japanese_share("x + y = 10, 2x - y = 5 を解くと x = 5, y = 5") == 1.0  # was 12/30: dropped
    assert japanese_share("詳細は https://example.com/the/path/of/docs を参照") == 1.0  # was 5/28
    assert japanese_share("質問は taro.yamada@example.co.jp まで") == 1.0
    assert japanese_share("長さは 5 cm、重さは 3 kg です") == 1.0
    assert japanese_share("x = 5, y = 3") is None  # nothing but symbols: no share, never fails
    assert japanese_share("CPUとメモリ") == 4 / 7  # a 3-letter word still counts
    english = "The answer is 5 because 2 plus 3 is 5."
    assert japanese_share(english) == 0.0
    assert check(turns(english, "答えは5です。")) == (
        {"japanese_share": [0.0, 1.0], "translation_tail": []}, ["not_japanese turn 0 (share 0.00 < 0.5)"])


def test_english_quoted_by_a_translation_question_is_material():
    from megatron_tanuki.synth.japanese import check

    question = "次の英文を日本語に訳してください。\n\nThe cat is sleeping on the table."
    answer = "テーブルの上で猫が寝ています。"
    assert check(turns(question, answer)) == ({"japanese_share": [1.0, 1.0], "translation_tail": []}, [])
    # the same English after a question that does not ask about English is a tail
    assert check(turns("猫はどこで寝ていますか？\n\nThe cat is sleeping on the table.", answer))[1] == [
        "not_japanese turn 0 (share 0.33 < 0.5)", "translation_tail turn 0"]  # 11 kana/kanji, 22 Latin
    # an assistant turn's English after Japanese is always a tail, even after such a question
    assert check(turns(question, "テーブルの上で猫が寝ています。\n\nThe cat is sleeping on the table.")) == (
        {"japanese_share": [1.0, round(14 / 36, 4)], "translation_tail": [1]},
        ["not_japanese turn 1 (share 0.39 < 0.5)", "translation_tail turn 1"])


def test_system_messages_are_not_turns():
    from megatron_tanuki.synth.japanese import check

    messages = turns("You are a helpful assistant. Answer in Japanese.", "りんごは何個ですか？",
                     "The answer is three apples in the basket.", roles=("system", "user", "assistant"))
    assert check(messages) == ({"japanese_share": [1.0, 0.0], "translation_tail": []},
                               ["not_japanese turn 1 (share 0.00 < 0.5)"])  # turn 1 = A1, as in ask_llm


def test_stamp_includes_the_tokenizer(tmp_path):
    """Saved scores are reused only under the same stamp; another tokenizer discards them."""
    def prepare(config):
        work = ask.ScoreWork(str(tmp_path / "ask"), "http://127.0.0.1:9/v1", config)
        work.add("0123456789abcdef", messages(["問題: 1+1は？", "2です。"]))
        work.finish_requests()
        return work

    work = prepare(ask.AskLLMConfig())
    assert work.stamp()["tokenizer"] is None
    (tmp_path / "ask" / "scores.jsonl").write_text('{"id": "0123456789abcdef:0", "scores": {"yes": 0.5}}\n')
    prepare(ask.AskLLMConfig())
    assert (tmp_path / "ask" / "scores.jsonl").exists()  # same stamp: kept
    work = prepare(ask.AskLLMConfig(tokenizer="llm-jp/llm-jp-3-1.8b"))
    assert not (tmp_path / "ask" / "scores.jsonl").exists()
    assert json.loads((tmp_path / "ask" / "stamp.json").read_text())["tokenizer"] == "llm-jp/llm-jp-3-1.8b"


# ------------------------------------------------------------------------------------ recipe errors

def test_recipe_yaml_with_unquoted_yes_no_keys():
    """``yes:`` and ``no:`` unquoted are true/false keys to PyYAML; they still mean the word lists."""
    import yaml

    d = yaml.safe_load("ask_llm:\n  yes: ['yes', 'Yes']\n  no: ['no']\n  keep_top: 0.8\n")
    assert set(d["ask_llm"]) == {True, False, "keep_top"}
    a = FilterConfig.from_dict(d, "recipe.yaml").ask_llm
    assert (a.yes, a.no, a.keep_top, a.effective_threshold()) == (("yes", "Yes"), ("no",), 0.8, None)


@pytest.mark.parametrize("filters, message", [
    ({"dedupe": {}}, "filters.dedupe: unknown field (known: dedup, lang, ask_llm)"),
    ({"ask_llm": {"yess": ["yes"]}}, "filters.ask_llm.yess: unknown field (known: prompt, yes, no, chat, reduce, "
                                     "threshold, keep_top, tokenizer, kv_memory_gb, model, api_key_env, concurrency, "
                                     "timeout_s, retries)"),
    ({"dedup": {"threshold": 1.5}}, "filters.dedup.threshold: must be a number in (0, 1], got 1.5"),
    ({"lang": {"min_share": "half"}}, "filters.lang.min_share: must be a number in [0, 1], got 'half'"),
    ({"ask_llm": {"prompt": "{conversation} {persona}"}},
     "filters.ask_llm.prompt: names {persona}; only {conversation} is defined"),
    ({"ask_llm": {"threshold": 0.5, "keep_top": 0.8}}, "filters.ask_llm: give threshold or keep_top, not both"),
    ({"ask_llm": {True: [True, "Yes"]}}, "filters.ask_llm.yes: must be a list of words (quote yes/no: unquoted, "
                                         "YAML reads them as true/false), got [True, 'Yes']"),
])
def test_filters_section_errors_name_file_and_field(tmp_path, filters, message):
    out = tmp_path / "run"
    write_run(out, [[record("clean", 0, CLEAN)]], filters=filters)
    with pytest.raises(ValueError) as e:
        run_filter(str(out), dedup=True, lang="ja", ask_llm=None, progress=False)
    assert str(e.value) == f"{out / 'recipe.yaml'}: {message}"
    assert not (out / "filtered" / "data.jsonl").exists()


def test_bad_data_names_file_and_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    good = record("clean", 0, CLEAN)
    write_run(out, [[good], [good]])
    second = out / "data" / "shard-00001-of-00002.jsonl"
    with pytest.raises(ValueError) as e:
        run_filter(str(out), dedup=True, lang="ja", ask_llm="http://127.0.0.1:9", progress=False)
    assert str(e.value) == (f"{second}:1: id {good['id']} again (first in shard-00000-of-00002.jsonl); join shards "
                            "with `tanuki synth merge`, which checks every id is there once")
    assert os.listdir(out / "filtered") == []  # no temporary file left, no output
    second.write_text(json.dumps(record("cm", 1, CLEAN)) + "\n{\"id\": \"x\"\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        run_filter(str(out), dedup=True, lang=None, ask_llm=None, progress=False)
    assert str(e.value) == f"{second}:2: not a JSON line (Expecting ',' delimiter at column 11)"
    assert os.listdir(out / "filtered") == []


# ------------------------------------------------------------------------------------ Ask-LLM

ASK_ROWS = {
    "apples": ["問題: りんごが3個あります。2個もらうと何個ですか？", "3個＋2個で5個です。",
               "問題: さらに4個もらうと何個ですか？", "5個＋4個で9個です。"],
    "pencils": ["問題: 1本80円の鉛筆を5本買うといくらですか？", "80円×5本で400円です。",
                "問題: 1000円出すとおつりはいくらですか？", "1000円−400円で600円です。"],
    "drive": ["問題: 時速40キロで3時間走ると何キロ進みますか？", "40キロ×3時間で120キロです。",
              "問題: 帰りは時速60キロでした。何時間かかりますか？", "120キロ÷60キロで2時間です。"],
}


def messages(turns):
    return [{"role": r, "content": t} for r, t in zip(ROLES, turns)]


def direct_probs(model, tok, prompt: str) -> torch.Tensor:
    """The scorer's next-token distribution at the end of the prompt, by transformers in fp32."""
    from megatron_tanuki.data import templates

    ids = templates.prompt_ids(tok, "tanuki", [("user", prompt)])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1, :tok.vocab_size]
    return torch.softmax(logits.double(), -1)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """``ck``: the tiny dense model (fp32) with its yes/Yes rows aimed at the prompts (see the module
    docstring), converted by `tanuki convert hf-to-mcore`; the direct forward's P(yes), P(Yes) and
    top-20 ids for every prompt of ASK_ROWS."""
    from megatron_tanuki.data import templates
    from megatron_tanuki.data.tokenizer import load_tokenizer
    from tests.convert import tiny_hf

    d = tmp_path_factory.mktemp("synth_filter")
    tok = load_tokenizer()
    yes, cap = tok.encode("yes"), tok.encode("Yes")
    assert len(yes) == 1 and len(cap) == 1  # single tokens of the shipped Tanuki tokenizer
    model = tiny_hf.dense_model(0)
    prompts = {(name, k): p for name, turns in ASK_ROWS.items() for k, p in enumerate(ask.prompts(messages(turns)))}
    with torch.no_grad():
        hidden = torch.stack([model.model(torch.tensor([templates.prompt_ids(tok, "tanuki", [("user", p)])]))
                              .last_hidden_state[0, -1] for p in prompts.values()])
        mean = hidden.mean(0)
        direction = mean / (hidden @ mean).mean()  # hidden . direction is 1 on average
        model.lm_head.weight[yes[0]] = 11.0 * direction
        model.lm_head.weight[cap[0]] = 6.0 * direction
    tiny_hf.save(model, str(d / "hf"), dtype=torch.float32)
    r = subprocess.run([TANUKI, "convert", "hf-to-mcore", "--hf", "hf", "--out", "ck"], cwd=d, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    probs = {key: direct_probs(model, tok, p) for key, p in prompts.items()}
    ref = {key: {"yes": p[yes[0]].item(), "Yes": p[cap[0]].item(),
                 "top20": set(torch.topk(p, 20).indices.tolist()), "ids": (yes[0], cap[0])}
           for key, p in probs.items()}
    return {"dir": d, "ck": str(d / "ck"), "ref": ref}


def expected_p(ref: dict, top20: bool = False) -> float:
    return sum(ref[w] for w, i in zip(("yes", "Yes"), ref["ids"]) if not top20 or i in ref["top20"])


def expected_scores(scorer, top20: bool = False) -> dict[str, list[float]]:
    return {name: [expected_p(scorer["ref"][(name, k)], top20) for k in range(4)] for name in ASK_ROWS}


def test_prompt_is_cumulative_and_pinned():
    ps = ask.prompts(messages(ASK_ROWS["apples"]))
    assert len(ps) == 4
    assert ps[1] == ("###\nユーザー: 問題: りんごが3個あります。2個もらうと何個ですか？\n\nアシスタント: 3個＋2個で5個です。\n###\n\n"
                     "上の###で囲まれた会話の内容は、与えられた情報だけで解くことができますか？ yes か no で答えてください。")
    assert all(ps[k + 1].startswith(ps[k].split("\n###\n\n")[0]) for k in range(3))


def test_yes_word_of_two_tokens_is_refused(scorer, tmp_path):
    out = tmp_path / "run"
    write_run(out, [[record("apples", 0, ASK_ROWS["apples"])]], filters={"ask_llm": {"yes": ["yes", "YES"]}})
    with pytest.raises(ValueError) as e:
        run_filter(str(out), dedup=False, lang=None, ask_llm=scorer["ck"], progress=False)
    assert str(e.value) == (f"{out / 'recipe.yaml'}: filters.ask_llm.yes: 'YES' encodes to 2 tokens [272, 22794] "
                            "of the scorer's tokenizer (the Tanuki tokenizer); each word must be one token (try it "
                            "with or without a leading space, or another spelling)")
    assert not (out / "filtered").exists()


def test_ask_llm_checkpoint_equals_direct_forward(scorer, tmp_path):
    """All three steps, as `tanuki synth filter OUT --dedup --lang ja --ask-llm CKPT` runs them:
    only the rows dedup and lang keep are scored; P(yes) = the direct forward's; the threshold (set
    between the two lowest scores) drops one row. Then --keep-top on the same output scores nothing
    again and keeps the best ceil(0.5 * 3) = 2."""
    expect = expected_scores(scorer)
    row_score = {name: min(v) for name, v in expect.items()}
    low = sorted(row_score.values())
    assert low[1] - low[0] > 1e-3 and all(1e-3 < p < 1 for v in expect.values() for p in v), expect
    threshold = round((low[0] + low[1]) / 2, 6)
    rows = [record(name, i, turns) for i, (name, turns) in enumerate(ASK_ROWS.items())]
    rows += [record("apples-again", 3, ASK_ROWS["apples"]), record("english", 4, ENGLISH)]
    out = tmp_path / "run"
    write_run(out, [rows], filters={"ask_llm": {"threshold": threshold, "kv_memory_gb": 0.05}})
    code = ("import json, sys\nfrom megatron_tanuki.synth.filters import run_filter\n"
            "s = run_filter(sys.argv[1], dedup=True, lang='ja', ask_llm=sys.argv[2])\nprint(json.dumps(s))\n")
    r = subprocess.run([sys.executable, "-c", code, str(out), scorer["ck"]], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got, summary = results(out)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == summary
    for name in ASK_ROWS:
        rec = got[row_id(name)]["filters"]["ask_llm"]
        assert rec["p_yes"] == pytest.approx(expect[name], abs=1e-5)
        assert rec["score"] == pytest.approx(row_score[name], abs=1e-5) and rec["score"] == min(rec["p_yes"])
        keep = row_score[name] >= threshold
        assert got[row_id(name)]["keep"] == keep
        assert got[row_id(name)]["drop_reasons"] == ([] if keep else [
            f"ask_llm score {rec['score']:.4f} < {threshold:g}"])
    for name in ("apples-again", "english"):
        assert "ask_llm" not in got[row_id(name)]["filters"] and not got[row_id(name)]["keep"]
    assert {k: summary[k] for k in ("rows", "kept", "dropped", "dropped_by_reason", "steps", "ask_llm")} == {
        "rows": 5, "kept": 2, "dropped": 3, "steps": ["dedup", "lang", "ask_llm"],
        "dropped_by_reason": {"ask_llm": 1, "exact_duplicate": 1, "not_japanese": 1},
        "ask_llm": {"scorer": scorer["ck"], "scored_rows": 3, "rule": {"threshold": threshold}}}
    scores = out / "filtered" / "ask_llm" / "scores.jsonl"
    assert len(scores.read_text(encoding="utf-8").splitlines()) == 12  # 3 rows x 4 prompts

    before = scores.read_bytes()
    summary = run_filter(str(out), dedup=True, lang="ja", ask_llm=scorer["ck"], keep_top=0.5, progress=False)
    assert scores.read_bytes() == before  # nothing scored again (and no model loaded in this process)
    got, _ = results(out)
    best = sorted(ASK_ROWS, key=lambda n: -row_score[n])
    for rank, name in enumerate(best, 1):
        row = got[row_id(name)]
        assert row["filters"]["ask_llm"]["rank"] == rank
        assert row["drop_reasons"] == ([] if rank <= 2 else ["ask_llm rank 3 of 3 (keep_top 0.5)"])
    assert summary["ask_llm"]["rule"] == {"keep_top": 0.5} and summary["kept"] == 2


class Serve:
    """`tanuki serve` on the tiny checkpoint, loopback, a free port; ready when /health answers."""

    def __init__(self, cwd, ckpt: str, ready_s: float = 120):
        import httpx

        from megatron_tanuki.runtime.spawn import free_port

        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(os.path.join(cwd, "serve.log"), "w+")
        self.proc = subprocess.Popen(
            [TANUKI, "serve", "--ckpt", ckpt, "--port", self.url.rsplit(":", 1)[1], "--kv-memory-gb", "0.05",
             "--max-seq-len", "256"], cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, env=ENV,
            start_new_session=True)
        deadline = time.monotonic() + ready_s
        while True:
            assert self.proc.poll() is None, f"tanuki serve exited:\n{self.text()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"tanuki serve not ready within {ready_s} s:\n{self.text()}")
            time.sleep(0.2)

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()


def test_ask_llm_url_through_tanuki_serve(scorer, tmp_path):
    """The URL path against a real server: /v1/completions with top-20 log-probs; P(yes) equals the
    direct forward's summed over the yes words inside its top 20 (here both are)."""
    expect = expected_scores(scorer, top20=True)
    assert expect == expected_scores(scorer)  # the rigged words are in the top 20
    out = tmp_path / "run"
    write_run(out, [[record(name, i, turns) for i, (name, turns) in enumerate(ASK_ROWS.items())]])
    server = Serve(tmp_path, scorer["ck"])
    try:
        config = FilterConfig.from_dict({"ask_llm": {"keep_top": 1.0, "concurrency": 4}}, "test")
        summary = run_filter(str(out), dedup=False, lang=None, ask_llm=server.url, config=config, progress=False)
    finally:
        server.stop()
    got, _ = results(out)
    for name in ASK_ROWS:
        rec = got[row_id(name)]["filters"]["ask_llm"]
        assert rec["p_yes"] == pytest.approx(expect[name], abs=1e-5), name
        assert got[row_id(name)]["keep"]
    assert summary["kept"] == 3 and summary["ask_llm"]["scored_rows"] == 3
    # the work folder keeps the scores for reruns; the request file (as large as the data) is gone
    assert sorted(os.listdir(out / "filtered" / "ask_llm")) == ["scores.jsonl", "stamp.json"]
