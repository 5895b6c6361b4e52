"""Build (or fetch from the cache) the toy teacher/student pair.

Both models are Qwen3-architecture causal LMs trained here by a short SFT recipe on the
toy task's train split (loss on the response only), then saved with `save_pretrained`
next to the toy tokenizer, so they load through `AutoModelForCausalLM.from_pretrained`
exactly like the hub's Qwen3 checkpoints.

    <cache_dir>/toy-<key>/teacher/   config.json, model.safetensors, tokenizer files
    <cache_dir>/toy-<key>/student/   the same
    <cache_dir>/toy-<key>/build.json the spec, greedy accuracies, SFT curves, timings

`key` hashes the whole build spec, so changing any size or step count builds a new pair,
and the same spec and seed always give the same weights on the same machine. A file
lock lets several runs of a sweep start at once: one builds, the others wait.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Qwen3Config, Qwen3ForCausalLM

from poweropd.toy.spec import BUILD_VERSION, ToyModelSpec, ToyPairSpec, cache_key
from poweropd.toy.task import OPENINGS, make_problems, opening_of, with_opening
from poweropd.toy.tokenizer import build_toy_tokenizer

log = logging.getLogger(__name__)

ROLE_SEED = {"teacher": 1, "student": 2}  # seed offsets of each role's data order and init


def pair_dir(spec: ToyPairSpec, cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir).expanduser() / f"toy-{cache_key(spec)}"


def ensure_toy_pair(spec: ToyPairSpec, cache_dir: str | os.PathLike) -> Path:
    """Return the directory of the built pair, building it first if it is not cached."""
    target = pair_dir(spec, cache_dir)
    if (target / "build.json").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        open(target.with_suffix(".lock"), "a").close()
    except OSError as exc:
        from poweropd.errors import ConfigError

        raise ConfigError(
            f"cannot write the toy pair's cache folder {target.parent} ({exc.strerror}); set model_pair.cache_dir "
            "(or POWEROPD_CACHE) to a writable folder"
        ) from None
    with _locked(target.with_suffix(".lock")):
        if (target / "build.json").exists():  # another process built it while we waited
            return target
        # Holding the lock, any temporary or partial folder is from a build that died (killed,
        # interrupted copy): remove it, so that the new build can take the name.
        for leftover in target.parent.glob(target.name + ".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if target.exists():
            log.warning("%s is incomplete (no build.json): building it again", target)
            aside = target.with_name(target.name + f".partial-{os.getpid()}")
            os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        log.info("building the toy teacher/student pair in %s (first use only)", target)
        try:
            _build(spec, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
        curve: dict[int, float] = {}
        check = _curve_recorder(model_spec, curve, tokenizer, eval_rows)
        model = train_sft(model_spec, spec, tokenizer, role, on_step=check)
        stopped_at = max(curve)
        accuracy = curve[stopped_at]
        model.save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
        report[role] = {
            "greedy_accuracy": accuracy,
            "sft_steps": stopped_at,
            "sft_curve": {str(k): v for k, v in sorted(curve.items())},
            "params": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(time.time() - start, 1),
        }
        log.info("toy %s: greedy accuracy %.1f%% on %d held-out problems", role, 100 * accuracy, len(eval_rows))
        if role == "teacher":
            # Can the teacher carry on after the student's habitual openings (it rarely writes them)?
            report[role]["greedy_accuracy_after_openings"] = greedy_accuracy(
                model, tokenizer, eval_rows, openings=OPENINGS
            )
    (out / "build.json").write_text(json.dumps(report, indent=2))


def _curve_recorder(model_spec: ToyModelSpec, curve: dict, tokenizer, eval_rows):
    """on_step for train_sft: records greedy accuracy into `curve` at the curve points and at
    every stop check; returns True (stop) once the stop-at-accuracy target is reached."""
    points = set(curve_points(model_spec.sft_steps))
    target = model_spec.stop_at_accuracy

    def check(step: int, model) -> bool:
        if step not in points and not (target and step % model_spec.check_every == 0):
            return False
        curve[step] = greedy_accuracy(model, tokenizer, eval_rows)
        return bool(target) and curve[step] >= target

    return check


def curve_points(steps: int, n: int = 4) -> list[int]:
    """Steps at which the build records greedy accuracy: n evenly spaced, ending at `steps`."""
    return sorted({max(1, round(steps * (i + 1) / n)) for i in range(n)})


def qwen3_config(model_spec: ToyModelSpec, tokenizer) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=model_spec.hidden,
        intermediate_size=model_spec.intermediate,
        num_hidden_layers=model_spec.layers,
        num_attention_heads=model_spec.heads,
        num_key_value_heads=model_spec.kv_heads,
        head_dim=model_spec.head_dim or model_spec.hidden // model_spec.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sft_corpus(spec: ToyPairSpec, role: str, n: int) -> list[tuple[str, str]]:
    """The first `n` (problem, response) pairs of a role's SFT corpus: the train split's
    solutions, opened in that role's style (ToyModelSpec.opening_rate / openings)."""
    model_spec: ToyModelSpec = getattr(spec, role)
    seed_offset = ROLE_SEED[role]
    rows = make_problems("train", n, seed=spec.seed + seed_offset)
    rng = random.Random(f"openings-{spec.seed}-{role}")
    return [(r["problem"], with_opening(r["solution"], rng, model_spec.opening_rate)) for r in rows]


def sft_batches(tokenizer, spec: ToyPairSpec, role: str, steps: int):
    """Yield (input_ids_BS, attention_mask_BS, labels_BS) with loss on the response only.

    Rows are grouped by length (16 batches at a time, batch order shuffled) so that
    padding costs little: the sequences are ~100 characters of varying length."""
    from poweropd.generation import chat_prompts  # local import: keeps toy.task torch-free

    corpus = sft_corpus(spec, role, steps * spec.batch_size)
    prompts = chat_prompts(tokenizer, [problem for problem, _ in corpus])
    responses = tokenizer([response for _, response in corpus], add_special_tokens=False)["input_ids"]
    examples = [(p, p + r + [tokenizer.eos_token_id]) for p, r in zip(prompts, responses)]
    order = torch.Generator().manual_seed(spec.seed * 1000 + ROLE_SEED[role])
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


def train_sft(model_spec: ToyModelSpec, spec: ToyPairSpec, tokenizer, role: str, on_step=None) -> Qwen3ForCausalLM:
    """SFT along a cosine schedule of `schedule_steps`, for at most `sft_steps` updates: a
    student stopped early in its schedule still has a learning curve ahead of it.
    `on_step(step, model)` is called after every update in eval mode; it returns True to stop
    there (the build's stop-at-accuracy rule)."""
    torch.manual_seed(spec.seed * 1000 + ROLE_SEED[role])
    model = Qwen3ForCausalLM(qwen3_config(model_spec, tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=model_spec.lr, betas=(0.9, 0.95), weight_decay=0.01)
    steps = model_spec.sft_steps
    total = max(model_spec.schedule_steps, steps)
    warmup = min(spec.warmup_steps, total)

    def lr_factor(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    bar = tqdm(total=steps, desc=f"toy {role} SFT", unit="step", leave=False)
    for step, (ids, mask, labels) in enumerate(sft_batches(tokenizer, spec, role, steps), start=1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            model.eval()
            stop = on_step(step, model)
            model.train()
            if stop:
                break
    bar.close()
    model.eval()
    return model


def greedy_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 128, openings=()) -> float:
    """Greedy accuracy on `rows`. With `openings`, every response is forced to begin with one
    of them (cycled over the rows) and the model writes the rest."""
    from poweropd.generation import SamplingParams, chat_prompts
    from poweropd.grading import extract_boxed
    from poweropd.hf_engine import generate

    prompts = chat_prompts(tokenizer, [r["problem"] for r in rows])
    if openings:
        prefixes = [openings[i % len(openings)] for i in range(len(rows))]
        prompts = [p + tokenizer(o, add_special_tokens=False)["input_ids"] for p, o in zip(prompts, prefixes)]
    params = SamplingParams(max_new_tokens=96, greedy=True)
    correct = 0
    with torch.no_grad():
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


def sft_curve(spec: ToyPairSpec, role: str = "student", points: list[int] | None = None) -> dict[int, float]:
    """Greedy accuracy along a role's SFT recipe, continued to the end of its schedule:
    shows how far the model could still go past where the build stops it."""
    model_spec: ToyModelSpec = getattr(spec, role)
    end = max(model_spec.schedule_steps, model_spec.sft_steps)
    points = points or curve_points(end, 5)
    tokenizer = build_toy_tokenizer()
    rows = make_problems("val", spec.eval_problems, seed=spec.seed)
    curve: dict[int, float] = {}
    full = ToyModelSpec(**{**asdict(model_spec), "sft_steps": max(points), "stop_at_accuracy": 0.0})
    train_sft(
        full,
        spec,
        tokenizer,
        role,
        on_step=lambda step, m: (
            curve.__setitem__(step, greedy_accuracy(m, tokenizer, rows)) if step in points else None
        ),
    )
    return curve


def opening_share(responses: list[str]) -> float:
    """Share of responses that open with one of the filler phrases."""
    return sum(opening_of(text) is not None for text in responses) / max(1, len(responses))


def rebuild(spec: ToyPairSpec, cache_dir: str | os.PathLike) -> Path:
    """Build `spec` into the cache, replacing a pair already cached under its key."""
    target = pair_dir(spec, cache_dir)
    if target.exists():
        with _locked(target.with_suffix(".lock")):
            aside = target.with_name(target.name + f".partial-{os.getpid()}")
            os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
    return ensure_toy_pair(spec, cache_dir)


def main(argv: list[str] | None = None) -> int:
    """`python -m poweropd.toy.build build [overrides]`: (re)build the toy pair of the spec into
    the cache and print its build record; `--ship` then copies it into the package with its
    sha256 manifest (maintainers: the default pair). `curve`: the default student's SFT curve,
    continued past its stop to the end of its schedule (greedy accuracy on held-out problems)."""
    import argparse

    from hydra import compose, initialize_config_dir

    from poweropd.config import register_configs, to_config

    parser = argparse.ArgumentParser(prog="python -m poweropd.toy.build", description=main.__doc__)
    parser.add_argument("command", choices=["build", "curve"])
    parser.add_argument("--role", choices=["student", "teacher"], default="student", help="curve: which model")
    parser.add_argument(
        "--points", default=None, help="curve: comma-separated SFT steps (default: 5 up to the schedule's end)"
    )
    parser.add_argument(
        "--ship", action="store_true", help="build: copy the pair into the package (src/poweropd/toy/pair)"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the pair, e.g. model_pair.toy.seed=1")
    args = parser.parse_args(argv)
    register_configs()
    conf_dir = Path(__file__).resolve().parents[3] / "conf"  # the repository's conf/ (run from a checkout)
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        pair_cfg = to_config(compose(config_name="config", overrides=args.overrides)).model_pair
    spec = pair_cfg.toy
    started = time.time()
    if args.command == "build":
        root = rebuild(spec, pair_cfg.cache_dir)
        report = json.loads((root / "build.json").read_text())
        for role in ("teacher", "student"):
            r = report[role]
            print(f"{role}: greedy accuracy {100 * r['greedy_accuracy']:.1f}% after {r['sft_steps']} SFT steps")
        print(f"built in {root} ({time.time() - started:.0f} s)")
        if args.ship:
            from poweropd.toy.shipped import ship

            print(f"shipped: {ship(root)}")
        return 0
    points = [int(p) for p in args.points.split(",")] if args.points else None
    curve = sft_curve(spec, args.role, points)
    for step, accuracy in sorted(curve.items()):
        print(f"step {step:5d}: greedy accuracy {accuracy * 100:5.1f}%")
    target = getattr(spec, args.role).stop_at_accuracy
    if target:
        print(f"(the build stops the {args.role} at the first check with >= {target * 100:g}%; see its build.json)")
    print(f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
