"""Benchmark 3: what the harness costs on top of the math.

The same toy OPD update (PowerOPD, the toy preset's batch of 32 rollouts of up to 64
tokens) two ways, each in its own process, from the same weights, seed and prompts:

    harness  what `run.py` does per step: opd_step (chat prompts, generate, masks, teacher
             and fused student kernels, statistics) + the metrics line + position statistics
             (every step here; the default is every 50)
    bare     a minimal loop written out by hand: apply_chat_template, left-pad, HF generate,
             teacher and student forward with full logits and log_softmax, the power reward,
             token-mean loss, backward, clip, AdamW

Both runs are repeated alternately (harness, bare, harness, bare, ...) so drift of the
machine hits both; the ratio is of median step times over all timed steps.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from poweropd.bench.common import fmt, non_negative_int, positive_int, run_isolated

ALPHA = 1.0


def _toy_spec(overrides: list[str]):
    """The toy pair's spec (conf/model_pair/toy.yaml's defaults) with `teacher.layers=1`-style
    overrides (a leading `model_pair.toy.` is accepted)."""
    from poweropd.toy.spec import ToyPairSpec

    spec = ToyPairSpec()
    for item in overrides:
        key, _, value = item.removeprefix("model_pair.toy.").partition("=")
        *parents, leaf = key.split(".")
        node = spec
        for name in parents:
            node = getattr(node, name)
        if not hasattr(node, leaf):
            raise SystemExit(
                f"error: --toy {item}: the toy pair has no field {key!r} (fields: see conf/model_pair/toy.yaml)"
            )
        setattr(node, leaf, type(getattr(node, leaf))(value))
    return spec


def _config(cache_dir: str | None, batch: int, max_new_tokens: int, threads: int, toy: list[str]):
    from poweropd.config import Config, LoggerConfig, ModelPairConfig, RewardConfig, TrainingConfig

    default_cache = os.environ.get("POWEROPD_CACHE", "~/.cache/poweropd")  # as conf/model_pair/toy.yaml
    pair = ModelPairConfig(stop_tokens=["<|im_end|>"], cache_dir=cache_dir or default_cache, toy=_toy_spec(toy))
    return Config(
        model_pair=pair,
        reward=RewardConfig(name="power", alpha=ALPHA),
        training=TrainingConfig(
            batch_size=batch,
            max_new_tokens=max_new_tokens,
            val_data="none",
            reward_dump_prompts=0,
            cpu_threads=threads,
        ),
        logger=LoggerConfig(name="local"),
    )


def harness_case(
    steps: int, warmup: int, batch: int, max_new_tokens: int, cache_dir: str | None, threads: int, toy: list[str]
) -> dict:
    from poweropd.stats import position_stats
    from poweropd.train import opd_step, setup_run

    cfg = _config(cache_dir, batch, max_new_tokens, threads, toy)
    if threads:
        torch.set_num_threads(threads)
    run = setup_run(cfg, Path(tempfile.mkdtemp()))
    run.tracker.start_fresh()
    times, generated = [], []
    try:
        for step in range(1, warmup + steps + 1):
            start = time.perf_counter()
            metrics, tokens = opd_step(run, run.sampler.next_batch(batch))
            run.tracker.log(step, metrics)
            if tokens:
                run.tracker.log_positions(step, position_stats(tokens))
            if step > warmup:
                times.append(time.perf_counter() - start)
                generated.append(metrics["n_generated"])
    finally:
        run.tracker.close()
        run.grader.close()
    return {"times": times, "generated": generated}


def bare_case(
    steps: int, warmup: int, batch: int, max_new_tokens: int, cache_dir: str | None, threads: int, toy: list[str]
) -> dict:
    """The minimal loop. Only model loading and the prompt stream are shared with the harness."""
    from accelerate.utils import set_seed

    from poweropd.data import PromptSampler, train_rows
    from poweropd.models import load_pair

    cfg = _config(cache_dir, batch, max_new_tokens, threads, toy)
    if threads:
        torch.set_num_threads(threads)
    pair = load_pair(cfg.model_pair, torch.device("cpu"))
    teacher, student, tok = pair.teacher, pair.student, pair.tokenizer
    stops = torch.tensor(pair.stop_ids)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.training.lr)
    sampler = PromptSampler(train_rows("toy", None), cfg.seed)
    set_seed(cfg.seed)

    def token_logprobs(model, ids, attn, pos, width):
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, width - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(2, ids[:, width:, None]).squeeze(-1)

    times, generated = [], []
    for step in range(1, warmup + steps + 1):
        start = time.perf_counter()
        rows = sampler.next_batch(batch)
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": r["problem"]}],
                add_generation_prompt=True,
                enable_thinking=False,
                tokenize=True,
                return_dict=False,
            )
            for r in rows
        ]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pair.pad_id] * (width - len(p)) + list(p) for p in prompts])
        attn = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        student.eval()
        with torch.no_grad():
            out = student.generate(
                input_ids=ids,
                attention_mask=attn,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                eos_token_id=pair.stop_ids,
                pad_token_id=pair.pad_id,
            )
        student.train()
        comp = out[:, width:]
        is_stop = torch.isin(comp, stops)
        valid = (is_stop.cumsum(-1) - is_stop.long()) == 0  # up to and including the first stop
        mask = (valid & ~is_stop).float()  # the terminal stop token is not trained on
        ids = torch.cat([ids, comp.masked_fill(~valid, pair.pad_id)], 1)
        full_attn = torch.cat([attn, valid.long()], 1)
        pos = (full_attn.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            lT = token_logprobs(teacher, ids, full_attn, pos, width)
        lS = token_logprobs(student, ids, full_attn, pos, width)
        reward = torch.exp(ALPHA * lT) - torch.exp(ALPHA * lS.detach())
        loss = -(reward * lS * mask).sum() / mask.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > warmup:
            times.append(time.perf_counter() - start)
            generated.append(int(valid.sum()))
    return {"times": times, "generated": generated}


def run(args, device: str) -> list[dict]:
    if device == "cuda":
        print("note: the overhead benchmark runs the toy pair on the CPU")
    _toy_spec(args.toy)  # a bad --toy override fails here, in one line, before any process starts
    kwargs = dict(
        steps=args.steps,
        warmup=args.warmup,
        batch=args.batch,
        max_new_tokens=args.max_new_tokens,
        cache_dir=args.cache_dir,
        threads=args.threads,
        toy=args.toy,
    )
    results = {"harness": [], "bare": []}
    for rnd in range(args.rounds):
        for kind in ("harness", "bare"):
            out = run_isolated(f"poweropd.bench.overhead:{kind}_case", kwargs)
            if "skipped" in out:
                raise SystemExit(f"the {kind} loop failed: {out['skipped']}")
            results[kind].append(out)
            print(f"round {rnd + 1} {kind:>8}: median step {statistics.median(out['times']):.4f} s", flush=True)
    rows = []
    for kind, outs in results.items():
        times = [t for o in outs for t in o["times"]]
        generated = [g for o in outs for g in o["generated"]]
        rows.append(
            {
                "kind": kind,
                "steps": len(times),
                "median_step_s": statistics.median(times),
                "mean_step_s": statistics.fmean(times),
                "round_medians_s": [statistics.median(o["times"]) for o in outs],
                "mean_generated_tokens": statistics.fmean(generated),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    by = {r["kind"]: r for r in rows}
    lines = [
        "| loop | timed steps | median step (s) | mean step (s) | per-round medians (s) | generated tokens / step |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("harness", "bare"):
        r = by[kind]
        rounds = ", ".join(f"{t:.4f}" for t in r["round_medians_s"])
        lines.append(
            f"| {kind} | {r['steps']} | {fmt(r['median_step_s'], 4)} | {fmt(r['mean_step_s'], 4)} | {rounds} | "
            f"{r['mean_generated_tokens']:.0f} |"
        )
    ratio = by["harness"]["median_step_s"] / by["bare"]["median_step_s"]
    lines.append(f"\nharness / bare (median step time): **{ratio:.3f}x**")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=positive_int, default=30, help="timed steps per round")
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--rounds", type=positive_int, default=2, help="alternating harness/bare rounds")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--cache-dir", default=None, help="toy pair cache (default: POWEROPD_CACHE or ~/.cache)")
    parser.add_argument("--toy", nargs="*", default=[], help="toy pair spec overrides, e.g. teacher.layers=1")


def describe(args, device: str) -> str:
    return (
        f"the toy pair on the CPU, PowerOPD alpha={ALPHA:g}, batch {args.batch}, "
        f"up to {args.max_new_tokens} new tokens; "
        f"{args.rounds} alternating rounds of {args.warmup} warm-up + {args.steps} timed steps per loop"
    )
