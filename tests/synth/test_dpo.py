"""`tanuki synth dpo` against two fake OpenAI-compatible servers on loopback: a policy and a judge.

The policy's answer names its question and which of the two answers it is (found from the request's
seed, derived here independently: sha256("<id>:<k>")); the judge reads the MT-Bench pair format back
out of its request and answers from a script keyed by the question's kind, so the test knows which
questions give consistent verdicts (and which answer must be chosen), ties, inconsistent and
unparseable verdicts; identical, empty and truncated answers never reach the judge (nor is the judge
phase started when only they are left). Requests failing for a passing reason (HTTP 500, no retries)
write nothing and the rerun asks again; a request refused (HTTP 400) rejects its question for good; a
rerun after that writes nothing; a torn line is redone. Questions come from a synth folder (its
filtered rows when filtered), a plain JSONL file or a JSONL file of synth records.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading

import pytest

from megatron_tanuki.synth.dpo import run_dpo
from megatron_tanuki.synth.dpo_spec import iter_questions, load_dpo
from megatron_tanuki.synth.fake_server import FakeServer

# question kind -> how many questions of it
KINDS = {"first": 3, "second": 3, "tie": 2, "position": 2, "wintie": 2, "garbage": 2, "several": 1,
         "same": 2, "cut": 1, "empty": 1, "flaky": 1, "policyflaky": 1}
PAIR_FORMAT = re.compile(r"\A\[User Question\]\n(.*)\n\n\[The Start of Assistant A's Answer\]\n(.*)\n"
                         r"\[The End of Assistant A's Answer\]\n\n\[The Start of Assistant B's Answer\]\n(.*)\n"
                         r"\[The End of Assistant B's Answer\]\Z", re.DOTALL)


def seed_of(qid: str, k: int) -> int:
    return int(hashlib.sha256(f"{qid}:{k}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def kind_of(text: str) -> str:
    return re.search(r"kind=(\w+)", text).group(1)


class ScriptedServer(FakeServer):
    """FakeServer whose answer (text, finish_reason) is ``script(messages, seed, body)`` (answered requests'
    JSON in ``bodies``). A script that raises answers "SCRIPT ERROR" and keeps the exception in ``errors``
    (a 500 would be retried with backoff: a slow failure)."""

    def __init__(self, script, **kw):
        self.script, self.errors = script, []
        super().__init__(answer=self._answer, **kw)

    def _answer(self, n, messages, seed, body):
        try:
            return self.script(messages, seed, body)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(e))
            return "SCRIPT ERROR", "stop"


class World:
    """Questions (a `tanuki synth run` output folder), a recipe, and the two scripted servers."""

    def __init__(self, root):
        self.root = root
        self.qids, self.kind = [], {}
        records = []
        for kind, n in KINDS.items():
            for j in range(n):
                qid = hashlib.sha256(f"{kind}{j}".encode()).hexdigest()[:16]
                self.qids.append(qid)
                self.kind[qid] = kind
                records.append({"id": qid, "index": len(records),
                                "messages": [{"role": "user", "content": f"問題 {kind}{j}: kind={kind} 3 + {j} は？"},
                                             {"role": "assistant", "content": str(3 + j)}]})
        self.questions = {r["id"]: r["messages"][0]["content"] for r in records}
        # a repeated record (same id) is read once
        write_jsonl(root / "synth_out" / "data" / "shard-00000-of-00001.jsonl", records + records[:1])
        self.by_seed = {seed_of(q, k): (q, k) for q in self.qids for k in (0, 1)}
        self.failed_once: set = set()
        self.lock = threading.Lock()

    def once(self, key) -> bool:
        with self.lock:
            if key in self.failed_once:
                return False
            self.failed_once.add(key)
            return True

    # -- the policy: "回答 <qid> k=<k>", found from the seed
    def policy(self, messages, seed, body):
        qid, k = self.by_seed[seed]
        kind = self.kind[qid]
        if kind == "same":
            return "同じ回答です。", "stop"
        if kind == "empty" and k == 1:
            return "   ", "stop"
        return f"回答 {qid} k={k}", "length" if kind == "cut" else "stop"

    def policy_faults(self, n, body):
        seed = body.get("seed")
        if seed in self.by_seed and self.kind[self.by_seed[seed][0]] == "policyflaky" and self.by_seed[seed][1] == 0 \
                and self.once(("policy", seed)):
            return "500"
        if seed in self.by_seed and self.kind[self.by_seed[seed][0]] == "toolong":
            return "400"
        return None

    # -- the judge: reads the pair format, answers by the question's kind and which answer is A
    def judge(self, messages, seed, body):
        m = PAIR_FORMAT.match(messages[-1]["content"])
        assert m, messages[-1]["content"]
        question, a, b = m.groups()
        ka, kb = (int(re.search(r"k=(\d)", x).group(1)) for x in (a, b))
        assert {ka, kb} == {0, 1}
        kind = kind_of(question)
        if kind in ("first", "flaky", "policyflaky"):
            v = "A" if ka == 0 else "B"
        elif kind == "second":
            v = "A" if ka == 1 else "B"
        elif kind == "tie":
            v = "C"
        elif kind == "position":
            v = "A"
        elif kind == "wintie":
            v = "A" if ka == 0 else "C"
        elif kind == "garbage":
            return "どちらの回答も良いと思います。", "stop"
        elif kind == "several":
            return ("比較の結果 [[A]]。" if ka == 0 else "[[A]] とも [[B]] とも言えます。"), "stop"
        else:
            raise AssertionError(f"the judge was asked about a {kind} question")
        return f"両方を比較しました。最終判定: [[{v}]]", "stop"

    def judge_faults(self, n, body):
        kind = kind_of(body["messages"][-1]["content"])
        if kind == "flaky" and self.once(("judge", body["messages"][-1]["content"])):
            return "500"
        return "400" if kind == "judgetoolong" else None


def write_jsonl(path, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_recipe(root, dpo: str, name: str = "dpo_test") -> str:
    write_jsonl(root / "seeds.jsonl", [{"topic": "算数"}])
    path = root / f"{name}.yaml"
    path.write_text(f"""name: {name}
teacher: {{name: fake}}
seeds:
  topic: {{source: seeds.jsonl}}
turns:
  - {{name: q1, role: user, prompt: [{{role: user, content: "{{topic}}の問題を作って"}}]}}
dpo:
{dpo}""", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    w = World(root)
    with ScriptedServer(w.policy, faults=w.policy_faults, model="fake-policy",
                        latency=lambda n, body: 0.002 * (n % 4)) as policy, \
            ScriptedServer(w.judge, faults=w.judge_faults, model="fake-judge",
                           latency=lambda n, body: 0.002 * (n % 3)) as judge:
        w.policy_srv, w.judge_srv = policy, judge
        w.recipe = write_recipe(root, f"""  questions: synth_out
  policy: {{base_url: "{policy.url}", max_retries: 0}}
  judge: {{base_url: "{judge.url}", model: fake-judge, max_retries: 0}}
  answers: 2
  policy_sampling: {{temperature: 0.7, top_p: 0.95, max_tokens: 64}}
  judge_max_tokens: 256
""")
        yield w


def by_id(rows) -> dict:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id written twice"
    return {r["id"]: r for r in rows}


def test_pairs_only_from_consistent_verdicts_then_rerun(world):
    w, out = world, world.root / "out"
    s1 = run_dpo(w.recipe, str(out), progress=False)
    assert w.policy_srv.errors == [] and w.judge_srv.errors == []

    # -- policy requests: two per question, distinct derived seeds, the recipe's sampling
    bodies = w.policy_srv.bodies
    assert sorted(b["seed"] for b in bodies) == sorted(s for s in w.by_seed if w.by_seed[s] != (
        next(q for q in w.qids if w.kind[q] == "policyflaky"), 0))
    for b in bodies:
        qid, _ = w.by_seed[b["seed"]]
        assert b["messages"] == [{"role": "user", "content": w.questions[qid]}]
        assert (b["temperature"], b["top_p"], b["max_tokens"]) == (0.7, 0.95, 64)

    # -- judge requests: both orders of a pair, answers swapped, temperature 0, the same system prompt
    judged = {q for q in w.qids if w.kind[q] not in ("same", "cut", "empty", "policyflaky")}
    asked: dict = {}
    for b in w.judge_srv.bodies:
        system, user = b["messages"]
        assert system["role"] == "system" and "[[A]]" in system["content"] and "[[C]]" in system["content"]
        assert (b["temperature"], b["max_tokens"]) == (0, 256)
        question, a, b_ = PAIR_FORMAT.match(user["content"]).groups()
        qid = next(q for q in w.qids if w.questions[q] == question)
        asked.setdefault(qid, []).append((a, b_))
    assert set(asked) == judged - {next(q for q in w.qids if w.kind[q] == "flaky")}
    for qid, orders in asked.items():
        a0, a1 = f"回答 {qid} k=0", f"回答 {qid} k=1"
        assert sorted(orders) == sorted([(a0, a1), (a1, a0)]), orders

    # -- pairs: consistent verdicts only, chosen the winner in both orders
    pairs = by_id(read_jsonl(out / "pairs.jsonl"))
    assert sorted(pairs) == sorted(q for q in w.qids if w.kind[q] in ("first", "second"))
    for qid, p in pairs.items():
        win = 0 if w.kind[qid] == "first" else 1
        assert p["prompt"] == w.questions[qid]
        assert (p["chosen"], p["rejected"]) == (f"回答 {qid} k={win}", f"回答 {qid} k={1 - win}")
        assert p["judge"]["model"] == "fake-judge"
        assert p["judge"]["verdicts"] == (["A", "B"] if win == 0 else ["B", "A"])
        assert [j.endswith(f"[[{v}]]") for j, v in zip(p["judge"]["judgments"], p["judge"]["verdicts"])] == [True] * 2
        assert p["policy"]["seeds"] == [seed_of(qid, 0), seed_of(qid, 1)]

    # -- rejects: every other decided question, with its reason
    want = {"tie": "tie", "position": "inconsistent", "wintie": "inconsistent", "garbage": "unparseable verdict",
            "several": "unparseable verdict", "same": "identical answers", "cut": "truncated answer",
            "empty": "empty answer"}
    rejects = by_id(read_jsonl(out / "rejects.jsonl"))
    assert {q: r["reason"] for q, r in rejects.items()} == {q: want[w.kind[q]] for q in w.qids if w.kind[q] in want}
    assert rejects[next(q for q in w.qids if w.kind[q] == "tie")]["judge"]["verdicts"] == ["C", "C"]
    assert rejects[next(q for q in w.qids if w.kind[q] == "wintie")]["judge"]["verdicts"] == ["A", "C"]
    assert rejects[next(q for q in w.qids if w.kind[q] == "several")]["judge"]["verdicts"] == ["A", None]
    assert "judge" not in rejects[next(q for q in w.qids if w.kind[q] == "same")]

    # -- counts: exact; the two failed questions are undecided (nothing written), errors by kind
    assert s1["questions"] == len(w.qids) and s1["duplicate_questions"] == 1
    assert s1["pairs"] == 6 and s1["rejected"] == 13
    assert s1["rejects"] == {"request error": 0, "empty answer": 1, "truncated answer": 1, "identical answers": 2,
                             "unparseable verdict": 3, "tie": 2, "inconsistent": 4}
    assert s1["undecided"] == 2
    assert s1["this_run"]["policy"]["errors"] == {"http_500": 1}
    assert s1["this_run"]["judge"]["errors"] == {"http_500": 2}
    assert s1["this_run"]["policy"]["failed"] == 1 and s1["this_run"]["judge"]["failed"] == 1
    assert json.loads((out / "summary.json").read_text()) == s1

    # -- the rerun asks again for the failed ones only
    n_policy, n_judge = w.policy_srv.requests, w.judge_srv.requests
    s2 = run_dpo(w.recipe, str(out), progress=False)
    assert (w.policy_srv.requests - n_policy, w.judge_srv.requests - n_judge) == (2, 4)
    assert s2["pairs"] == 8 and s2["undecided"] == 0 and s2["rejects"] == s1["rejects"]
    pairs = by_id(read_jsonl(out / "pairs.jsonl"))
    for kind in ("flaky", "policyflaky"):
        qid = next(q for q in w.qids if w.kind[q] == kind)
        assert pairs[qid]["chosen"] == f"回答 {qid} k=0"

    # -- a rerun now writes nothing and asks nothing
    files = {f: (out / f).read_bytes() for f in ("answers.jsonl", "pairs.jsonl", "rejects.jsonl")}
    n_policy, n_judge = w.policy_srv.requests, w.judge_srv.requests
    s3 = run_dpo(w.recipe, str(out), progress=False)
    assert (w.policy_srv.requests, w.judge_srv.requests) == (n_policy, n_judge)
    assert {f: (out / f).read_bytes() for f in files} == files
    assert (s3["pairs"], s3["rejected"], s3["undecided"]) == (8, 13, 0)
    assert {p["note"] for p in s3["this_run"].values()} == {"nothing to do (not started)"}

    # -- a torn last line (killed mid-write) is cut off and that pair redone, once
    data = files["pairs.jsonl"]
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    (out / "pairs.jsonl").write_bytes(data[:last + 20])
    run_dpo(w.recipe, str(out), progress=False)
    assert w.judge_srv.requests - n_judge == 2 and w.policy_srv.requests == n_policy
    assert (out / "pairs.jsonl").read_bytes() == data


def test_jsonl_questions_default_out_and_another_section_refused(world, tmp_path):
    w = world
    write_jsonl(tmp_path / "qs" / "questions.jsonl",
                [{"id": 7, "q": "kind=first 一つ目"}, {"q": "kind=second 二つ目"}, {"q": "kind=tie 三つ目"}])
    no_id = hashlib.sha256("kind=second 二つ目".encode()).hexdigest()[:16]
    for qid in ("7", no_id, hashlib.sha256("kind=tie 三つ目".encode()).hexdigest()[:16]):
        w.by_seed.update({seed_of(qid, k): (qid, k) for k in (0, 1)})
        w.kind[qid] = "x"  # the policy's kind lookup: a plain answer
    recipe = write_recipe(tmp_path, f"""  questions: qs/questions.jsonl
  question_field: q
  policy: {{base_url: "{w.policy_srv.url}", model: fake-policy}}
  judge: {{base_url: "{w.judge_srv.url}", model: fake-judge}}
""", name="jsonl_dpo")
    s = run_dpo(recipe, limit=2, progress=False)
    assert w.policy_srv.errors == [] and w.judge_srv.errors == []
    out = tmp_path / "qs" / "jsonl_dpo_dpo"       # beside the questions
    pairs = by_id(read_jsonl(out / "pairs.jsonl"))
    assert sorted(pairs) == sorted(["7", no_id])
    assert (pairs["7"]["chosen"], pairs[no_id]["chosen"]) == ("回答 7 k=0", f"回答 {no_id} k=1")
    assert (s["questions"], s["pairs"], s["rejected"]) == (2, 2, 0)

    other = write_recipe(tmp_path, f"""  questions: qs/questions.jsonl
  question_field: q
  policy: {{base_url: "{w.policy_srv.url}", model: fake-policy}}
  judge: {{base_url: "{w.judge_srv.url}", model: fake-judge}}
  judge_max_tokens: 99
""", name="jsonl_dpo")
    with pytest.raises(ValueError, match="holds the output of another recipe or dpo section"):
        run_dpo(other, str(out), progress=False)


@pytest.mark.parametrize("body, where", [
    ("  questions: q.jsonl\n  policy: {base_url: 'http://127.0.0.1:9/v1'}\n  judge: {base_url: 'http://127.0.0.1:9/v1'}\n"
     "  judge_temperature: 0\n", "dpo.judge_temperature: unknown field"),
    ("  questions: q.jsonl\n  policy: {base_url: 'http://127.0.0.1:9/v1', temp: 1}\n"
     "  judge: {base_url: 'http://127.0.0.1:9/v1'}\n", "dpo.policy.temp: unknown field"),
    ("  questions: q.jsonl\n  policy: {base_url: 'http://127.0.0.1:9/v1', tp: 2}\n"
     "  judge: {base_url: 'http://127.0.0.1:9/v1'}\n", "dpo.policy.tp: belongs to ckpt"),
    ("  questions: q.jsonl\n  policy: {base_url: 'http://127.0.0.1:9/v1'}\n  judge: {base_url: 'http://127.0.0.1:9/v1'}\n"
     "  answers: 3\n", "dpo.answers: 3: only 2"),
    ("  questions: q.jsonl\n  policy: {base_url: 'http://127.0.0.1:9/v1'}\n  judge: {base_url: 'http://127.0.0.1:9/v1'}\n"
     "  judge_prompt: {user: '{question} {answer_a}'}\n", "dpo.judge_prompt.user: must contain {answer_b}"),
    ("  questions: nowhere.jsonl\n  policy: {base_url: 'http://127.0.0.1:9/v1'}\n"
     "  judge: {base_url: 'http://127.0.0.1:9/v1'}\n", "dpo.questions: .*nowhere.jsonl: not found"),
])
def test_invalid_dpo_section_names_file_and_field(tmp_path, body, where):
    write_jsonl(tmp_path / "q.jsonl", [{"question": "1 + 1 は？"}])
    recipe = write_recipe(tmp_path, body)
    with pytest.raises(ValueError, match=re.escape(recipe) + ": " + where):
        load_dpo(recipe)
    with pytest.raises(ValueError, match=re.escape(recipe) + ": " + where):
        run_dpo(recipe, progress=False)


def jsonl_recipe(w, root, name: str, kinds: dict, extra: str = "") -> str:
    """A recipe over a plain JSONL file of questions {"id": qid, "q": "kind=<kind> ..."} (``kinds``:
    qid -> kind), asking the world's servers; the policy answers them "回答 <qid> k=<k>"."""
    write_jsonl(root / "questions.jsonl", [{"id": qid, "q": f"{qid}: kind={kind} は？"} for qid, kind in kinds.items()])
    for qid, kind in kinds.items():
        w.by_seed.update({seed_of(qid, k): (qid, k) for k in (0, 1)})
        w.kind[qid] = kind
    return write_recipe(root, f"""  questions: questions.jsonl
  question_field: q
  policy: {{base_url: "{w.policy_srv.url}", model: fake-policy}}
  judge: {{base_url: "{w.judge_srv.url}", model: fake-judge}}
  out: out
{extra}""", name=name)


def test_refused_request_rejects_its_question_once(world, tmp_path):
    """An HTTP 400 (a prompt over the context) is the question's fault: rejected with the side and the
    server's message, on the policy's side and on the judge's; a rerun asks nothing for them."""
    w = world
    recipe = jsonl_recipe(w, tmp_path, "refused", {"long-policy": "toolong", "long-judge": "judgetoolong",
                                                   "fine": "first"})
    n_policy, n_judge = w.policy_srv.requests, w.judge_srv.requests
    s1 = run_dpo(recipe, progress=False)
    assert w.policy_srv.errors == [] and w.judge_srv.errors == []
    assert (w.policy_srv.requests - n_policy, w.judge_srv.requests - n_judge) == (6, 4)   # a 400 is not retried
    out = tmp_path / "out"
    assert sorted(by_id(read_jsonl(out / "pairs.jsonl"))) == ["fine"]
    rejects = by_id(read_jsonl(out / "rejects.jsonl"))
    assert sorted(rejects) == ["long-judge", "long-policy"]
    refused = "/chat/completions: HTTP 400: fake: injected bad request"
    policy, judge = rejects["long-policy"], rejects["long-judge"]
    assert (policy["reason"], policy["side"], policy["error"]) == ("request error", "policy", w.policy_srv.url + refused)
    assert (judge["reason"], judge["side"], judge["error"]) == ("request error", "judge", w.judge_srv.url + refused)
    assert "answers" not in policy and judge["answers"] == ["回答 long-judge k=0", "回答 long-judge k=1"]
    assert (s1["pairs"], s1["rejected"], s1["undecided"], s1["rejects"]["request error"]) == (1, 2, 0, 2)
    policy_run, judge_run = s1["this_run"]["policy"], s1["this_run"]["judge"]
    assert (policy_run["errors"], policy_run["request error"], policy_run["answered"]) == ({"http_400": 2}, 1, 2)
    assert (judge_run["errors"], judge_run["request error"], judge_run["pairs"]) == ({"http_400": 2}, 1, 1)
    assert "failed" not in policy_run and "failed" not in judge_run

    files = {f: (out / f).read_bytes() for f in ("answers.jsonl", "pairs.jsonl", "rejects.jsonl")}
    n_policy, n_judge = w.policy_srv.requests, w.judge_srv.requests
    s2 = run_dpo(recipe, progress=False)
    assert (w.policy_srv.requests, w.judge_srv.requests) == (n_policy, n_judge)
    assert {f: (out / f).read_bytes() for f in files} == files
    assert {p["note"] for p in s2["this_run"].values()} == {"nothing to do (not started)"}


def test_only_unjudgeable_answers_left_starts_no_judge(world, tmp_path):
    """Every pair identical: rejected before the judge is placed, the judge phase is not started."""
    w = world
    recipe = jsonl_recipe(w, tmp_path, "all_same", {"same-a": "same", "same-b": "same", "same-c": "same"})
    n_policy, n_judge = w.policy_srv.requests, w.judge_srv.requests
    s = run_dpo(recipe, progress=False)
    assert (w.policy_srv.requests - n_policy, w.judge_srv.requests - n_judge) == (6, 0)
    assert s["this_run"]["judge"] == {"questions": 0, "skipped": 0, "finished": 0,
                                      "note": "nothing to do (not started)", "identical answers": 3}
    assert (s["pairs"], s["rejected"], s["undecided"], s["rejects"]["identical answers"]) == (0, 3, 0, 3)
    assert {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")} == \
        dict.fromkeys(("same-a", "same-b", "same-c"), "identical answers")


def test_questions_from_filtered_folder_and_synth_jsonl(tmp_path):
    """A filtered synth folder gives only its keep: true rows (a stale filter is refused); a JSONL file
    of synth records, without question_field, gives every record's first user message."""
    def record(qid, question):
        return {"id": qid, "messages": [{"role": "system", "content": "丁寧に"}, {"role": "user", "content": question},
                                        {"role": "assistant", "content": "答え"},
                                        {"role": "user", "content": "続き"}]}

    rows = [record("a", "問題A"), record("b", "問題B"), record("c", " 問題C ")]
    write_jsonl(tmp_path / "synth" / "data" / "shard-00000-of-00001.jsonl", rows)
    servers = "  policy: {base_url: 'http://127.0.0.1:9/v1'}\n  judge: {base_url: 'http://127.0.0.1:9/v1'}\n"
    recipe = write_recipe(tmp_path, "  questions: synth\n" + servers)
    assert list(iter_questions(load_dpo(recipe))) == [("a", "問題A"), ("b", "問題B"), ("c", "問題C")]

    write_jsonl(tmp_path / "synth" / "filtered" / "data.jsonl",
                [{**r, "keep": r["id"] != "b", "drop_reasons": []} for r in rows])
    (tmp_path / "synth" / "filtered" / "summary.json").write_text(json.dumps({"rows": 3, "kept": 2}))
    assert list(iter_questions(load_dpo(recipe))) == [("a", "問題A"), ("c", "問題C")]

    write_jsonl(tmp_path / "synth" / "data" / "shard-00001-of-00002.jsonl", [record("d", "問題D")])
    with pytest.raises(ValueError, match=re.escape(recipe) + r": dpo.questions: .*filtered: filtered 3 rows, but "
                       r"data/ holds 4 now.*\(a filtered folder's questions are the rows `tanuki synth filter` kept\)"):
        load_dpo(recipe)

    no_id = {"messages": [{"role": "user", "content": "問題E"}, {"role": "assistant", "content": "答え"}]}
    write_jsonl(tmp_path / "chats.jsonl", rows[:2] + [no_id])
    spec = load_dpo(write_recipe(tmp_path, "  questions: chats.jsonl\n" + servers))
    assert spec.question_field is None
    assert list(iter_questions(spec)) == [("a", "問題A"), ("b", "問題B"),
                                          (hashlib.sha256("問題E".encode()).hexdigest()[:16], "問題E")]
