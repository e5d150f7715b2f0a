"""``tanuki score-reward``: a reward model (Nemotron-4-340B-Reward) scores conversations from a JSONL file.

Input lines ``{"id", "messages": [{"role", "content"}, ...]}`` (an optional leading system message,
then user/assistant turns, ending with the assistant answer to score). Output lines
``{"id", "attributes": {helpfulness, correctness, coherence, complexity, verbosity}, "reward", "raw",
"tokens"}`` -- ``raw``: all of the head's outputs; ``reward``: the model card's weighted sum of the five
attributes. A bad line becomes ``{"id", "error", "line"}`` and the rest is scored; a rerun skips the
ids already in the output (the same resume rules as `tanuki generate`).

The text and the output names come from the architecture's registry record (``reward_format``): for
Nemotron-4 NeMo-Aligner's SteerLM/regression reward-model format -- its default system prompt unless the
conversation brings one, the chat turns, then the label prefix ``<extra_id_2>`` right after the last
answer's newline -- and the score is the head's output at its last token. Conversations go through the model in batches of right-padded rows (causal
attention: padding after a row's end never reaches its last token), through the same forward-only
pipeline schedule as ``convert verify`` under any TP x PP layout.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from megatron_tanuki.inference.generate import Writer, is_done, parse_requests, read_done

@dataclass
class RewardJob:
    ckpt: str
    input: str
    output: str
    tp: int = 1
    pp: int = 1
    ep: int = 1
    nproc: int | None = None
    batch_size: int = 4
    tokenizer: str | None = None
    dtype: str | None = None


def reward_text(messages, where: str, fmt) -> str:
    """The scored text of one conversation in ``fmt`` (a registry RewardFormat)."""
    from megatron_tanuki.data import templates

    turns = templates.message_turns(messages, where)
    if not turns or turns[-1][0] != "assistant":
        raise templates.ConversationError(f"{where}: the last message must be the assistant answer to score")
    if turns[0][0] != "system":
        turns.insert(0, ("system", fmt.system))
    # roles (a system message only first, then user/assistant alternating) are checked by render
    head = templates.render(templates.get(fmt.template), turns[:-1], where, unit="message", prompt=True)
    return "".join(t for t, _ in head) + turns[-1][1] + "\n" + fmt.label


def scores_record(rid, raw: list[float], tokens: int, fmt) -> dict:
    attrs = dict(zip(fmt.attributes, raw[-len(fmt.attributes):]))
    reward = sum(w * attrs[a] for a, w in zip(fmt.attributes, fmt.weights))
    return {"id": rid, "attributes": attrs, "reward": reward, "raw": raw, "tokens": tokens}


def score_batch(chunks, rows: list[list[int]], pad_id: int) -> list[list[float]] | None:
    """The head's outputs at each row's last token (on every rank; the last stage computes them)."""
    import torch.distributed as dist

    from megatron_tanuki.inference.logits import forward_logits

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    out = forward_logits(chunks, ids, gather=False)
    mine = [out[i, len(r) - 1].tolist() for i, r in enumerate(rows)] if out is not None else None
    # the last stage's ranks hold the scores; every rank (rank 0 writes) takes the first copy
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return next(x for x in everyone if x is not None)


def reward_rank(job: RewardJob) -> dict:
    import torch.distributed as dist

    from megatron_tanuki.data.templates import encode_text
    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.inference.generate import checkpoint_tokenizer, load_model

    t0 = time.perf_counter()
    from megatron_tanuki.models import registry

    cfg, chunks, _ = load_model(job, reward=True)
    fmt = registry.architecture_of(cfg).reward_format
    for c in chunks:
        c.eval()
    tok = load_tokenizer(job.tokenizer or checkpoint_tokenizer(job.ckpt))
    rank0 = dist.get_rank() == 0
    done = read_done(job.output) if rank0 else None
    box = [done]
    dist.broadcast_object_list(box, src=0)
    done = box[0]
    writer = Writer(job.output) if rank0 else None
    counts = {"scored": 0, "errors": 0, "skipped": 0}
    batch: list[tuple[object, list[int]]] = []

    def flush():
        if not batch:
            return
        raw = score_batch(chunks, [ids for _, ids in batch], tok.pad_id)
        for (rid, ids), values in zip(batch, raw):
            if writer:
                writer.write(scores_record(rid, values, len(ids), fmt))
            counts["scored"] += 1
        batch.clear()

    limit = cfg.max_position_embeddings
    for p in parse_requests(job.input):
        if is_done(p, done):
            counts["skipped"] += 1
            continue
        error = p.error
        if error is None:
            where = f"{job.input}:{p.line}"
            try:
                ids = encode_text(tok, reward_text(p.request.get("messages"), where, fmt), images=False, bos=False)[0]
                if len(ids) > limit:
                    raise ValueError(f"{where}: {len(ids)} tokens; {cfg.name} takes at most {limit}")
            except ValueError as e:  # templates.ConversationError included
                error = str(e)
        if error is not None:
            if writer:
                writer.write({"id": p.id, "error": error, "line": p.line})
            counts["errors"] += 1
            continue
        batch.append((p.id, ids))
        if len(batch) >= job.batch_size:
            flush()
    flush()
    if writer:
        writer.close()
    return {**counts, "seconds": round(time.perf_counter() - t0, 1)}


def check_job(job: RewardJob) -> None:
    if not os.path.isfile(job.input):
        raise FileNotFoundError(2, "input file not found", job.input)
    if os.path.exists(job.output) and os.path.samefile(job.input, job.output):
        raise ValueError(f"--output {job.output}: is the input file; scores go to another file")
    if job.batch_size < 1:
        raise ValueError(f"--batch-size {job.batch_size}: must be at least 1")
    if job.nproc is not None and job.nproc != job.tp * job.pp * job.ep:
        raise ValueError(f"--nproc {job.nproc}: score-reward runs one model replica (TP x PP x EP = "
                         f"{job.tp * job.pp * job.ep} ranks)")


def run(job: RewardJob) -> list:
    """Under torchrun/srun: this rank; else TP*PP*EP local ranks."""
    from megatron_tanuki.runtime.spawn import run_job

    check_job(job)
    return run_job(reward_rank, job, job.tp * job.pp * job.ep)
