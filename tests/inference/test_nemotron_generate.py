"""`tanuki generate` on the tiny Nemotron-4 converted from the NeMo zarr fixture, with its chat template.

The checkpoint carries its own tokenizer (hf/tokenizer.model, as nemo-to-mcore copies it), so no
--tokenizer and no --chat are given: the architecture's defaults apply. Greedy answers equal
transformers' NemotronForCausalLM greedy decoding of the same prompt ids (built from the zarr tensors by
hand, tests/convert/test_nemotron.py) over the tokenizer's 240 ids, cut at the template's stop strings.
"""
import json
import os
import shutil
import subprocess
import sys

import torch

from megatron_tanuki.convert import nemo
from megatron_tanuki.data.templates import NEMOTRON4, encode_text, prompt_ids
from megatron_tanuki.data.tokenizer import load_tokenizer
from tests.convert.test_nemotron import FIXTURE, reference_hf_folder
from tests.unit.tiny_spm import make_nemotron_spm

TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID", "SLURM_STEP_ID")},
       "OMP_NUM_THREADS": "1"}
REQUESTS = [
    {"id": "a", "messages": [{"role": "user", "content": "東京はどこ?"}]},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                             {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]},
]
MAX_TOKENS = 12


def test_generate_uses_the_template_tokenizer_and_matches_transformers(tmp_path):
    from transformers import NemotronForCausalLM

    ck = str(tmp_path / "ck")
    nemo.nemo_to_mcore(FIXTURE, ck, dtype="fp32")
    (tmp_path / "tok").mkdir()
    shutil.copy(make_nemotron_spm(str(tmp_path / "tok")), os.path.join(ck, "hf", "tokenizer.model"))
    inp, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in REQUESTS))
    r = subprocess.run([TANUKI, "generate", "--ckpt", ck, "--input", str(inp), "--output", str(out),
                        "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--kv-memory-gb", "0.01"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {rec["id"]: rec for rec in map(json.loads, out.read_text().splitlines())}

    tok = load_tokenizer(os.path.join(ck, "hf", "tokenizer.model"))
    hf = NemotronForCausalLM.from_pretrained(reference_hf_folder(str(tmp_path / "ref"))).eval()
    exact = {"a": "<extra_id_0>System\n\n<extra_id_1>User\n東京はどこ?\n<extra_id_1>Assistant\n",
             "b": "<extra_id_0>System\nBe brief.\n<extra_id_1>User\nhello\n<extra_id_1>Assistant\nhi\n"
                  "<extra_id_1>User\nagain\n<extra_id_1>Assistant\n"}
    for req in REQUESTS:
        turns = [(m["role"], m["content"]) for m in req["messages"]]
        ids = prompt_ids(tok, NEMOTRON4, turns)
        assert ids == encode_text(tok, exact[req["id"]], images=False, bos=False)[0]  # the exact NeMo text, no BOS
        rec = got[req["id"]]
        assert rec["prompt_tokens"] == len(ids)
        seq = []
        with torch.no_grad():  # greedy over the ids the tokenizer has (the engine never emits padded-vocab rows)
            while len(seq) < min(MAX_TOKENS, 64 - len(ids)) and tok.eos_id not in seq:  # 64 positions
                seq.append(int(hf(torch.tensor([ids + seq])).logits[0, -1, :tok.vocab_size].argmax()))
        text = tok.decode(seq)
        cuts = [text.find(s) for s in NEMOTRON4.stop if s in text]
        want = text[:min(cuts)] if cuts else text
        assert rec["text"] == want, (rec, seq)
        assert rec["finish_reason"] == ("stop" if cuts or tok.eos_id in seq else "length")
