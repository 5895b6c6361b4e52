"""Build (or fetch from the cache) the toy teacher/student pair.

Both models are Qwen3-architecture causal LMs trained here by a short SFT recipe on the
toy task's train split (loss on the response only), then saved with `save_pretrained`
next to the toy tokenizer, so they load through `AutoModelForCausalLM.from_pretrained`
exactly like the hub's Qwen3 checkpoints.

    <cache_dir>/toy-<key>/teacher/   config.json, model.safetensors, tokenizer files
    <cache_dir>/toy-<key>/student/   the same
    <cache_dir>/toy-<key>/build.json the spec, greedy accuracies, timings

`key` hashes the whole build spec, so changing any size or step count builds a new pair,
and the same spec and seed always give the same weights on the same machine. A file
lock lets several runs of a sweep start at once: one builds, the others wait.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Qwen3Config, Qwen3ForCausalLM

from poweropd.toy.spec import ToyModelSpec, ToyPairSpec
from poweropd.toy.task import TASK_VERSION, make_problems
from poweropd.toy.tokenizer import build_toy_tokenizer

log = logging.getLogger(__name__)

BUILD_VERSION = 1  # bump when the recipe changes in a way the spec does not capture


def cache_key(spec: ToyPairSpec) -> str:
    blob = json.dumps({"version": BUILD_VERSION, "task": TASK_VERSION, **asdict(spec)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pair_dir(spec: ToyPairSpec, cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir).expanduser() / f"toy-{cache_key(spec)}"


def ensure_toy_pair(spec: ToyPairSpec, cache_dir: str | os.PathLike) -> Path:
    """Return the directory of the built pair, building it first if it is not cached."""
    target = pair_dir(spec, cache_dir)
    if (target / "build.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_suffix(".lock")):
        if (target / "build.json").exists():  # another process built it while we waited
            return target
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("building the toy teacher/student pair in %s (first use only)", target)
        _build(spec, tmp)
        os.replace(tmp, target)
    return target


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(spec: ToyPairSpec, out: Path) -> None:
    tokenizer = build_toy_tokenizer()
    report: dict = {"spec": asdict(spec), "key": cache_key(spec), "version": BUILD_VERSION}
    eval_rows = make_problems("val", spec.eval_problems, seed=spec.seed)
    for role in ("teacher", "student"):
        model_spec: ToyModelSpec = getattr(spec, role)
        start = time.time()
        model = train_sft(model_spec, spec, tokenizer, role)
        accuracy = greedy_accuracy(model, tokenizer, eval_rows)
        model.save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
        report[role] = {
            "greedy_accuracy": accuracy,
            "params": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(time.time() - start, 1),
        }
        log.info("toy %s: greedy accuracy %.1f%% on %d held-out problems", role, 100 * accuracy, len(eval_rows))
    (out / "build.json").write_text(json.dumps(report, indent=2))


def qwen3_config(model_spec: ToyModelSpec, tokenizer) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=model_spec.hidden,
        intermediate_size=model_spec.intermediate,
        num_hidden_layers=model_spec.layers,
        num_attention_heads=model_spec.heads,
        num_key_value_heads=model_spec.kv_heads,
        head_dim=model_spec.hidden // model_spec.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sft_batches(tokenizer, spec: ToyPairSpec, steps: int, seed_offset: int):
    """Yield (input_ids_BS, attention_mask_BS, labels_BS) with loss on the response only.

    Rows are grouped by length (16 batches at a time, batch order shuffled) so that
    padding costs little: the sequences are ~100 characters of varying length."""
    from poweropd.rollout import chat_prompts  # local import: keeps toy.task torch-free

    rows = make_problems("train", steps * spec.batch_size, seed=spec.seed + seed_offset)
    prompts = chat_prompts(tokenizer, [r["problem"] for r in rows])
    responses = tokenizer([r["solution"] for r in rows], add_special_tokens=False)["input_ids"]
    examples = [(p, p + r + [tokenizer.eos_token_id]) for p, r in zip(prompts, responses)]
    order = torch.Generator().manual_seed(spec.seed * 1000 + seed_offset)
    group = 16 * spec.batch_size
    for start in range(0, len(examples), group):
        chunk = sorted(examples[start : start + group], key=lambda e: len(e[1]))
        batches = [chunk[i : i + spec.batch_size] for i in range(0, len(chunk), spec.batch_size)]
        for b in torch.randperm(len(batches), generator=order).tolist():
            yield _collate(batches[b], tokenizer.pad_token_id)


def _collate(batch, pad_id: int):
    width = max(len(seq) for _, seq in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (prompt, seq) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(prompt) : len(seq)] = torch.tensor(seq[len(prompt) :])
    return ids, mask, labels


def train_sft(model_spec: ToyModelSpec, spec: ToyPairSpec, tokenizer, role: str) -> Qwen3ForCausalLM:
    seed_offset = {"teacher": 1, "student": 2}[role]
    torch.manual_seed(spec.seed * 1000 + seed_offset)
    model = Qwen3ForCausalLM(qwen3_config(model_spec, tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=model_spec.lr, betas=(0.9, 0.95), weight_decay=0.01)
    total, warmup = model_spec.sft_steps, min(spec.warmup_steps, model_spec.sft_steps)

    def lr_factor(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    bar = tqdm(total=total, desc=f"toy {role} SFT", unit="step", leave=False)
    for ids, mask, labels in sft_batches(tokenizer, spec, total, seed_offset):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model


def greedy_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 128) -> float:
    from poweropd.grading import extract_boxed
    from poweropd.rollout import SamplingParams, chat_prompts, generate

    prompts = chat_prompts(tokenizer, [r["problem"] for r in rows])
    params = SamplingParams(max_new_tokens=64, greedy=True)
    correct = 0
    for start in range(0, len(rows), batch_size):
        rollouts = generate(
            model,
            prompts[start : start + batch_size],
            params,
            stop_ids=[tokenizer.eos_token_id],
            pad_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(rollouts.completion_ids_BT, skip_special_tokens=True)
        for row, text in zip(rows[start : start + batch_size], texts):
            correct += extract_boxed(text) == row["answer"]
    return correct / len(rows)
