"""`tanuki score-reward` on a tiny Nemotron-4 reward model against a plain reference.

The reference is transformers' NemotronModel (the trunk, final norm included) followed by a plain
torch linear head at each conversation's last token -- what NeMo-Aligner's RewardModelHead computes.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megatron_tanuki.data.templates import encode_text
from megatron_tanuki.data.tokenizer import load_tokenizer
from megatron_tanuki.inference.reward import reward_text
from megatron_tanuki.models.registry import NEMOTRON4
from tests.unit.tiny_spm import make_nemotron_spm

FMT = NEMOTRON4.reward_format
ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")  # HelpSteer2, the last five
WEIGHTS = (0.3, 0.74, 0.46, 0.47, -0.33)  # the model card's
TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
CONVERSATIONS = [
    [{"role": "user", "content": "東京はどこ?"}, {"role": "assistant", "content": "日本の首都です。"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "It is six, of course, as anyone can check quickly."}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}],
]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    from transformers import NemotronConfig, NemotronForCausalLM

    base = tmp_path_factory.mktemp("reward")
    torch.manual_seed(0)
    cfg = NemotronConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    model = NemotronForCausalLM(cfg).eval()
    head = torch.nn.Linear(64, 9)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.1)
        head.weight.normal_(0, 0.3)
    hf = base / "hf"
    model.save_pretrained(hf)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd.update({"rm_head.weight": head.weight.detach().clone(), "rm_head.bias": head.bias.detach().clone()})
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    conf = json.load(open(hf / "config.json"))
    json.dump({**conf, "reward_outputs": 9}, open(hf / "config.json", "w"))
    ck = str(base / "ck")
    r = subprocess.run([TANUKI, "convert", "hf-to-mcore", "--hf", str(hf), "--out", ck], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (base / "tok").mkdir()
    tok_path = make_nemotron_spm(str(base / "tok"))
    return model, head, ck, tok_path, base


def reference(model, head, tok, messages) -> list[float]:
    ids = encode_text(tok, reward_text(messages, "ref", FMT), images=False, bos=False)[0]
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        return head(hidden).tolist()


def test_reward_text_is_nemo_aligner_format():
    assert reward_text(CONVERSATIONS[1], "x", FMT) == (
        "<extra_id_0>System\nBe brief.\n<extra_id_1>User\n2+2?\n<extra_id_1>Assistant\n4\n<extra_id_1>User\n"
        "and 3+3?\n<extra_id_1>Assistant\nIt is six, of course, as anyone can check quickly.\n<extra_id_2>")


def test_reward_text_brings_nemo_aligners_default_system_prompt():
    assert reward_text(CONVERSATIONS[2], "x", FMT) == (
        "<extra_id_0>System\nA chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions.\n<extra_id_1>User\nhello\n"
        "<extra_id_1>Assistant\nhi\n<extra_id_2>")


def test_a_reward_model_does_not_generate(reward_model):
    _, _, ck, tok_path, base = reward_model
    (base / "q.jsonl").write_text('{"id": 1, "prompt": "a"}\n')
    r = subprocess.run([TANUKI, "generate", "--ckpt", ck, "--input", str(base / "q.jsonl"), "--output",
                        str(base / "a.jsonl"), "--tokenizer", tok_path], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().endswith(
        f"{ck}: nemotron is a reward model (it scores, it does not generate): use `tanuki score-reward`"), r.stderr


def test_scores_equal_reference_and_resume(reward_model):
    model, head, ck, tok_path, base = reward_model
    tok = load_tokenizer(tok_path)
    inp, out = base / "conv.jsonl", base / "scored.jsonl"
    lines = [json.dumps({"id": f"c{i}", "messages": m}, ensure_ascii=False) for i, m in enumerate(CONVERSATIONS)]
    lines.insert(1, json.dumps({"id": "bad", "messages": [{"role": "user", "content": "no answer"}]}))
    inp.write_text("\n".join(lines) + "\n")
    results = {}
    for tp in (1, 2):
        dest = base / f"scored-tp{tp}.jsonl"
        r = subprocess.run([TANUKI, "score-reward", "--ckpt", ck, "--input", str(inp), "--output", str(dest),
                            "--tokenizer", tok_path, "--batch-size", "2", "--tp", str(tp)],
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "3 conversation(s) scored, 1 error record(s)" in r.stdout
        results[tp] = {rec["id"]: rec for rec in map(json.loads, dest.read_text().splitlines())}
    recs = results[1]
    assert recs["bad"] == {"id": "bad", "line": 2,
                           "error": f"{inp}:2: the last message must be the assistant answer to score"}
    for i, m in enumerate(CONVERSATIONS):
        rec, want = recs[f"c{i}"], reference(model, head, tok, m)
        assert len(rec["raw"]) == 9 and max(abs(a - b) for a, b in zip(rec["raw"], want)) <= 1e-4, (rec, want)
        assert list(rec["attributes"]) == list(ATTRIBUTES)
        assert rec["attributes"]["verbosity"] == rec["raw"][8] and rec["attributes"]["helpfulness"] == rec["raw"][4]
        assert rec["reward"] == pytest.approx(sum(w * v for w, v in zip(WEIGHTS, rec["raw"][4:])), abs=1e-9)
        assert max(abs(a - b) for a, b in zip(rec["raw"], results[2][f"c{i}"]["raw"])) <= 1e-4  # TP=2 = TP=1
    # a rerun skips what is there
    before = (base / "scored-tp1.jsonl").read_bytes()
    r = subprocess.run([TANUKI, "score-reward", "--ckpt", ck, "--input", str(inp), "--output",
                        str(base / "scored-tp1.jsonl"), "--tokenizer", tok_path], capture_output=True, text=True)
    assert r.returncode == 0 and "0 conversation(s) scored, 0 error record(s), 4 already in" in r.stdout, r.stderr
    assert (base / "scored-tp1.jsonl").read_bytes() == before


def test_a_language_model_is_refused(tmp_path):
    from megatron_tanuki.convert import nemo

    fixture = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "nemo-zarr-tiny")
    ck = str(tmp_path / "ck")
    nemo.nemo_to_mcore(fixture, ck, dtype="fp32")
    (tmp_path / "in.jsonl").write_text('{"id": 1, "messages": [{"role": "user", "content": "a"}, '
                                       '{"role": "assistant", "content": "b"}]}\n')
    r = subprocess.run([TANUKI, "score-reward", "--ckpt", ck, "--input", str(tmp_path / "in.jsonl"),
                        "--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().endswith(f"{ck}: nemo-zarr-tiny has no reward head (score-reward needs a reward model, "
                                      f"e.g. Nemotron-4-340B-Reward)"), r.stderr
