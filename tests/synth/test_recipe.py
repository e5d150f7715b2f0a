"""Recipes: every shipped recipe loads and renders the seed team's prompts exactly; a broken recipe
fails naming the file and the field; ids and seeds are stable and distinct; turn rules retry and reject.

The reference strings below are the seed team's prompt templates (yuta0x89/nedo_project_code, branch
team_hatakeyama_phase2, ota/topic-hub/synth_topic_multiturn.py, Apache-2.0), written with str.format as
their script does, and their Nemotron-4 prompt rendering (``apply_chat_template`` of NemotronVLLM).
"""
from __future__ import annotations

import glob
import os
import re

import pytest

from megatron_tanuki.synth.backend import TurnResult
from megatron_tanuki.synth.conversation import ABANDON, DONE, NEXT, REJECT, RETRY, Conversation
from megatron_tanuki.synth.recipe import RecipeError, load_recipe, turn_seed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "examples", "synth_*.yaml")))
CONVERSATION_RECIPES = [p for p in RECIPES if "captions" not in p and "dpo" not in p]

SEED_Q1 = """Create a {task} problem related to the following {topic}:

{item}

Note:

1. The {task} problem should be simple and involve basic {task} skills and knowledge. Any average grade school student can solve it correctly.
2. You should make full use of the {topic} description to create the {task} problem to ensure that the {task} problem is unique and specific to the {topic}.
3. Your response should always start with "問題:". Your response should not include a solution to the created {task} problem.
4. 簡潔に日本語で回答してください。
"""  # noqa: E501
SEED_A1 = "{question_1}\n\n簡潔に日本語で回答してください。"
SEED_Q2 = ("前述の問題をより理解するために、簡潔な追加の質問を一つ作りなさい。問題の一部を変更したり、条件を追加しても良いです。"
           "追加の質問だけを書き、決して答えを含めないでください。")
SEED_A2 = "{question_2}\n\n簡潔に日本語で回答してください。"


def seed_nemotron_prompt(messages) -> str:
    """The seed team's Nemotron-4 prompt text for a request (their hand-written chat template)."""
    heads = {"system": "<extra_id_0>System\n", "user": "<extra_id_1>User\n", "assistant": "<extra_id_1>Assistant\n"}
    return "".join(f"{heads[m['role']]}{m['content']}\n" for m in messages) + "<extra_id_1>Assistant\n"


def test_schema_is_a_valid_recipe_and_examples_exist():
    from megatron_tanuki.synth.job import SCHEMA

    assert len(CONVERSATION_RECIPES) >= 8
    names = {os.path.basename(p) for p in RECIPES}
    for want in ("synth_persona_math_nemotron4.yaml", "synth_persona_math_tanuki.yaml",
                 "synth_reasoning_topics_nemotron4.yaml", "synth_math_topics_nemotron4.yaml",
                 "synth_coding_topics_nemotron4.yaml"):
        assert want in names
    r = load_recipe(SCHEMA)
    assert [t.name for t in r.turns] == ["q1", "a1", "q2", "a2"]
    assert r.hash == load_recipe(os.path.join(ROOT, "examples", "synth_persona_math_nemotron4.yaml")).hash


@pytest.mark.parametrize("path", CONVERSATION_RECIPES, ids=os.path.basename)
def test_shipped_recipe_renders_the_seed_teams_prompts(path):
    r = load_recipe(path)
    topic = "persona" if "persona" in path else "topic"
    assert [s.name for s in r.seeds] == [topic, "task"]
    assert r.turns[-1].sampling["max_tokens"] == (1024 if "coding" in path else 512)  # the seed team's
    assert all(t.sampling["temperature"] == 0.7 for t in r.turns)
    for index in (0, 7, 12345):
        c = Conversation(r, index)
        v = c.seeds
        q1 = c.request()
        body = [m for m in q1.messages if m["role"] != "system"]
        assert body == [{"role": "user", "content": SEED_Q1.format(task=v["task"], topic=topic, item=v[topic])}]
        if "nemotron4" in path:  # the exact text the seed team sent to Nemotron-4
            from megatron_tanuki.data import templates

            text = "".join(s for s, _ in templates.render(templates.get(r.teacher.chat),
                                                            [(m["role"], m["content"]) for m in q1.messages],
                                                            prompt=True))
            assert text == seed_nemotron_prompt(q1.messages)
            assert q1.messages[0] == {"role": "system", "content": ""}
        # the later turns, with stand-in answers
        c.outputs, c.turn = {"q1": "Q-one"}, 1
        assert [m for m in c.request().messages if m["role"] != "system"] == [
            {"role": "user", "content": SEED_A1.format(question_1="Q-one")}]
        c.outputs["a1"], c.turn = "A-one", 2
        assert [m for m in c.request().messages if m["role"] != "system"] == [
            {"role": "user", "content": "Q-one"}, {"role": "assistant", "content": "A-one"},
            {"role": "user", "content": SEED_Q2}]
        c.outputs["q2"], c.turn = "Q-two", 3
        assert [m for m in c.request().messages if m["role"] != "system"] == [
            {"role": "user", "content": "Q-one"}, {"role": "assistant", "content": "A-one"},
            {"role": "user", "content": SEED_A2.format(question_2="Q-two")}]


def test_tool_only_recipes_load_their_section(tmp_path):
    from megatron_tanuki.synth.recipe import load_section

    s = load_section(os.path.join(ROOT, "examples", "synth_dpo_tanuki.yaml"), "dpo")
    assert s.name == "persona_math_dpo" and {"questions", "policy", "judge"} <= set(s.section)
    path = _write(tmp_path, "name: x\ndpo: {questions: q}\nturnz: []\n")
    with pytest.raises(RecipeError, match=re.escape(f"{path}: turnz: unknown field (known: description, dpo, name)")):
        load_section(path, "dpo")
    with pytest.raises(RecipeError, match=re.escape(f"{path}: captions: missing: the recipe has no captions section")):
        load_section(_write(tmp_path, "name: x\n"), "captions")


def test_ids_and_seeds_are_stable_and_distinct():
    path = os.path.join(ROOT, "examples", "synth_persona_math_nemotron4.yaml")
    a, b = load_recipe(path), load_recipe(path)
    ids = [a.conversation_id(i) for i in range(5000)]
    assert ids == [b.conversation_id(i) for i in range(5000)] and len(set(ids)) == 5000
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    assert [a.variables(i) for i in range(50)] == [b.variables(i) for i in range(50)]
    seeds = {turn_seed(i, t, k) for i in ids[:500] for t in ("q1", "a1") for k in range(3)}
    assert len(seeds) == 3000  # every (slot, turn, attempt) its own sampling seed
    # count is not part of the identity: raising it extends the run with the same ids
    import yaml

    data = yaml.safe_load(open(path, encoding="utf-8"))
    data["count"] = 7
    from megatron_tanuki.synth.recipe import parse_recipe

    assert parse_recipe(data, path).conversation_id(3) == ids[3]
    data["sampling"]["temperature"] = 0.8
    assert parse_recipe(data, path).conversation_id(3) != ids[3]
    data["sampling"]["temperature"] = 0.7  # other seed values, same spec: another recipe (ids change)
    data["seeds"]["persona"]["limit"] = 100
    assert parse_recipe(data, path).conversation_id(3) != ids[3]


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(text, encoding="utf-8")
    return str(p)


BASE = """name: t
count: 10
teacher: {name: x, chat: tanuki}
seeds:
  persona: {source: builtin:persona_jp, limit: 3}
  task: {source: tasks.jsonl, weight_field: w}
turns:
  - {name: q1, role: user, prompt: [{role: user, content: "{persona} {task}"}]}
  - {name: a1, role: assistant, prompt: [{role: user, content: "{q1}"}]}
"""


def test_sampled_weights_and_product_order(tmp_path):
    (tmp_path / "tasks.jsonl").write_text('{"task": "a", "w": 1}\n{"task": "b", "w": 0}\n{"task": "c", "w": 3}\n',
                                          encoding="utf-8")
    r = load_recipe(_write(tmp_path, BASE))
    drawn = [r.variables(i)["task"] for i in range(2000)]
    assert "b" not in drawn and 0.68 < drawn.count("c") / 2000 < 0.82
    r = load_recipe(_write(tmp_path, BASE.replace(", weight_field: w", "") + "combine: product\n"))
    assert [tuple(r.variables(i).values()) for i in range(10)] == [
        (p, t) for p in r.seeds[0].values for t in "abc"] + [(r.seeds[0].values[0], "a")]


@pytest.mark.parametrize("edit, field, message", [
    (("count: 10", "count: 10\ncolour: red"), "colour", "unknown field"),
    (("limit: 3}", "limit: 3, fild: persona}"), "seeds.persona.fild", "unknown field"),
    (("source: tasks.jsonl", "source: missing.jsonl"), "seeds.task.source", "missing.jsonl: seed file not found"),
    (("builtin:persona_jp", "builtin:personas"), "seeds.persona.source", "no such shipped list"),
    (('content: "{q1}"', 'content: "{q3}"'), "turns[1].prompt[0].content", "{q3} is not defined (defined here: "
                                                                            "persona, task, q1)"),
    (('content: "{q1}"', 'content: "{q1.x}"'), "turns[1].prompt[0].content", "must be a plain name"),
    (("role: assistant, prompt", "role: user, prompt"), "turns[1].role", "alternate user, assistant"),
    (("name: a1", "name: q1"), "turns[1].name", "not used by a seed or an earlier turn"),
    (("chat: tanuki}", "chat: tanukii}"), "teacher.chat", "unknown conversation template"),
    (("chat: tanuki}", "chat: plain, system: hi}"), "teacher.system", "has no system turn"),
    (("turns:", "sampling: {top_p: 0}\nturns:"), "sampling", "0 < top_p <= 1"),
    (("  task: {source", "  id: {source: builtin:basic_task}\n  task: {source"), "seeds.id",
     "'id' is a field of every record"),
    (('content: "{q1}"', 'content: "{q1!r}"'), "turns[1].prompt[0].content", "takes no conversion or format spec"),
    (('content: "{q1}"', 'content: "{q1:>10}"'), "turns[1].prompt[0].content", "takes no conversion or format spec"),
    (("limit: 3}", "limit: 0}"), "seeds.persona.limit", "a positive integer"),
    (("limit: 3}", "limit: abc}"), "seeds.persona.limit", "a positive integer"),
])
def test_invalid_recipe_names_file_and_field(tmp_path, edit, field, message):
    (tmp_path / "tasks.jsonl").write_text('{"task": "a", "w": 1}\n', encoding="utf-8")
    text = BASE.replace(*edit)
    assert text != BASE
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}: {field}: "), str(e.value)
    assert message in str(e.value)


def test_hf_dataset_seed_source(tmp_path):
    """A saved Hugging Face dataset (Nemotron-Personas-Japan, FinePersonas load the same way) as a seed list."""
    import datasets

    datasets.Dataset.from_dict({"persona": ["漁師", "薬剤師", "棋士"], "w": [1, 2, 3]}).save_to_disk(
        str(tmp_path / "personas"))
    text = BASE.replace("builtin:persona_jp, limit: 3", "hf:personas").replace("tasks.jsonl, weight_field: w",
                                                                                 "hf:personas, field: persona")
    r = load_recipe(_write(tmp_path, text))
    assert r.seeds[0].values == ["漁師", "薬剤師", "棋士"] and r.seeds[1].values == ["漁師", "薬剤師", "棋士"]
    assert r.seeds[0].source == "hf:personas"
    (tmp_path / "nope").mkdir()  # a folder that is not a saved dataset (no hub lookup in tests)
    with pytest.raises(RecipeError, match=re.escape(f"{tmp_path / 'recipe.yaml'}: seeds.persona.source: hf:nope: "
                                                    "cannot load")):
        load_recipe(_write(tmp_path, text.replace("hf:personas}", "hf:nope}", 1)))


def test_bad_seed_line_and_missing_field_are_named(tmp_path):
    (tmp_path / "tasks.jsonl").write_text('{"task": "a", "w": 1}\n{"task": \n', encoding="utf-8")
    path = _write(tmp_path, BASE)
    with pytest.raises(RecipeError, match=re.escape(f"{tmp_path / 'tasks.jsonl'}:2: not a JSON line")):
        load_recipe(path)
    (tmp_path / "tasks.jsonl").write_text('{"tusk": "a", "w": 1}\n', encoding="utf-8")
    with pytest.raises(RecipeError, match=re.escape(f"{tmp_path / 'tasks.jsonl'}:1: no string field 'task'")):
        load_recipe(path)


def test_turn_rules_retry_with_new_seeds_then_reject():
    r = load_recipe(os.path.join(ROOT, "examples", "synth_persona_math_nemotron4.yaml"))
    c = Conversation(r, 3)
    first = c.request()
    # no 問題: -> retried with another seed
    assert c.accept(TurnResult(first.key, "答えは3です。")) == RETRY
    second = c.request()
    assert second.key.endswith(":q1:1") and second.seed != first.seed and second.messages == first.messages
    # truncated by max_tokens -> retried
    assert c.accept(TurnResult(second.key, "問題: 長い", finish_reason="length")) == RETRY
    # the cleanup rules take the prefix and the translation tail off
    third = c.request()
    assert c.accept(TurnResult(third.key, "問題: りんごが3個あります。(Translation: There are 3 apples.)")) == NEXT
    assert c.outputs["q1"] == "りんごが3個あります。"
    a1 = c.request()
    assert a1.key.endswith(":a1:0")  # a new turn starts at attempt 0
    for k in range(r.retries):
        assert c.accept(TurnResult(c.request().key, "   ")) == RETRY
    # a teacher failure is not the conversation's fault: abandoned (left for the rerun), never rejected
    assert c.accept(TurnResult(c.request().key, "", finish_reason="error", error="HTTP 500", error_kind="http_500")) \
        == ABANDON
    # a request the engine refuses outright is rejected at once (it would fail the same way again)
    c = Conversation(r, 3)
    c.accept(TurnResult(c.request().key, "問題: りんごが3個あります。"))
    assert c.accept(TurnResult(c.request().key, "", finish_reason="error", error="the prompt has 9000 tokens",
                               error_kind="request")) == REJECT
    rej = c.reject_record()
    assert rej["turn"] == "a1" and rej["reason"] == "backend error (request): the prompt has 9000 tokens"
    assert rej["attempts"] == 1
    assert rej["messages"] == [{"role": "user", "content": "りんごが3個あります。"}]


def test_a_conversation_completes_into_the_record_schema():
    r = load_recipe(os.path.join(ROOT, "examples", "synth_reasoning_topics_nemotron4.yaml"))
    c = Conversation(r, 11)
    outcomes = [c.accept(TurnResult(c.request().key, text, prompt_tokens=5, completion_tokens=3))
                for text in ("問題: 「A」か「B」か？", "Aです。", "追加の質問: Cなら？", "Cです。")]
    assert outcomes == [NEXT, NEXT, NEXT, DONE]
    rec = c.record()
    assert list(rec) == ["id", "index", "messages", "topic", "task", "teacher", "recipe", "sampling", "seed",
                         "finish_reasons", "created"]
    assert rec["messages"] == [{"role": "user", "content": "「A」か「B」か？"}, {"role": "assistant", "content": "Aです。"},
                               {"role": "user", "content": "Cなら？"}, {"role": "assistant", "content": "Cです。"}]
    assert rec["id"] == r.conversation_id(11) and rec["recipe"] == {"name": r.name, "hash": r.hash}
    assert rec["teacher"] == "nemotron4-340b-instruct" and rec["finish_reasons"] == ["stop"] * 4
    assert rec["sampling"]["q1"] == {"temperature": 0.7, "top_p": 1.0, "max_tokens": 512,
                                     "stop": ["<|endoftext|>", "<extra_id_0>", "<extra_id_1>", "\x11"]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rec["created"])
