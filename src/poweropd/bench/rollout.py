"""Benchmark 5: rollout generation, HF `generate` vs the vLLM engine.

The same prompts and lengths through both engines, each (model, engine) in its own process:

    toy         the built toy student (its vocabulary of 46 tokens), the toy val prompts,
                training sampling (T 1), real stop tokens
    qwen3-mini  a random Qwen3-architecture student with the Qwen3 vocabulary (151,936),
                hidden 512, 4 layers: the real vocabulary at a size two CPU cores can run;
                random prompts, full-length rollouts (its stop id, the last, has chance 1/V)
    qwen3-0.6b  the Qwen3-0.6B shape (a GPU job)

Per row: rollout tokens per second (median over timed repeats, after a warm-up), for vLLM
its start-up and the weight sync time per update (median of repeats, the trainer's exact
sync call), and evaluation samples per second (the paper's evaluation sampling: T 0.6,
top_p 0.95, top_k 20, n samples per prompt through the evaluation code path). On the toy
model both engines also decode the prompts greedily, and the share of identical rollouts
is reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from poweropd.bench.common import QWEN3_VOCAB, fmt, positive_int
from poweropd.flops import QWEN3, Arch

MODELS = {
    "qwen3-mini": Arch(512, 4, 1536, 8, 2, 64, QWEN3_VOCAB),
    "qwen3-0.6b": QWEN3["Qwen/Qwen3-0.6B-Base"],
}


def _model_and_prompts(model: str, prompts: int, prompt_len: int, cache_dir: str | None, device: str):
    """(HF model, its saved folder, prompts, stop ids, pad id)."""
    if model == "toy":
        from poweropd.config import ModelPairConfig
        from poweropd.data import val_rows
        from poweropd.models import load_pair

        cfg = ModelPairConfig(kind="toy", **({"cache_dir": cache_dir} if cache_dir else {}))
        pair = load_pair(cfg, torch.device(device))
        from poweropd.generation import chat_prompts

        rows = val_rows("toy", prompts, None)
        ids = chat_prompts(pair.tokenizer, [r["problem"] for r in rows], cfg.instruction)
        return pair.student, pair.student_path, ids, pair.stop_ids, pair.pad_id
    from poweropd.bench.step import build_model
    from poweropd.hf_engine import neutralize_generation_defaults

    arch = MODELS[model]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    student = build_model(arch, dtype, device, seed=0)
    neutralize_generation_defaults(student)
    folder = tempfile.mkdtemp(prefix="bench_rollout_")
    student.save_pretrained(folder)
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, arch.vocab, (prompt_len,), generator=gen).tolist() for _ in range(prompts)]
    # The last id as the stop token: a random model samples it with chance 1/V per token, so
    # the rollouts run (nearly always) to full length in both engines.
    return student, folder, ids, [arch.vocab - 1], 0


def measure(
    model: str,
    engine: str,
    prompts: int,
    prompt_len: int,
    max_new_tokens: int,
    repeats: int,
    eval_n: int,
    threads: int,
    cache_dir: str | None,
    device: str,
) -> dict:
    """One (model, engine) measurement; runs in its own process."""
    from poweropd.engines import make_engine
    from poweropd.generation import SamplingParams, sample_completions

    if threads:
        torch.set_num_threads(threads)
    student, folder, ids, stop_ids, pad_id = _model_and_prompts(model, prompts, prompt_len, cache_dir, device)
    student.eval().requires_grad_(False)
    started = time.perf_counter()
    dtype = str(next(student.parameters()).dtype).removeprefix("torch.")
    in_memory = student if engine == "hf" else None  # vLLM loads the saved folder
    eng = make_engine(engine, stop_ids=stop_ids, pad_id=pad_id, model=in_memory, model_path=folder, dtype=dtype, seed=0)
    startup = time.perf_counter() - started
    sampling = SamplingParams(max_new_tokens, temperature=1.0)

    def rollouts():
        out = eng.generate(ids, sampling)
        return int(out.lengths_B.sum())

    torch.manual_seed(0)
    rollouts()  # warm-up (kernels, caches)
    times, tokens = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens.append(rollouts())
        times.append(time.perf_counter() - t0)
    rates = [n / t for n, t in zip(tokens, times)]
    row = {
        "model": model,
        "engine": engine,
        "prompts": len(ids),
        "max_new_tokens": max_new_tokens,
        "mean_rollout_tokens": statistics.mean(tokens) / len(ids),
        "tokens_per_s": statistics.median(rates),
        "startup_s": startup,
    }
    if engine == "vllm":
        syncs = [eng.sync(student) for _ in range(5)]
        row["sync_s"] = statistics.median(syncs)

    class _Decoder:  # evaluation decodes text; the random models have no tokenizer, ids suffice
        def batch_decode(self, ids_BT, skip_special_tokens=True):
            return [" ".join(map(str, r)) for r in ids_BT.tolist()]

    eval_params = SamplingParams(max_new_tokens, temperature=0.6, top_p=0.95, top_k=20)
    t0 = time.perf_counter()
    done = sample_completions(eng, _Decoder(), ids, eval_n, eval_params, batch_size=len(ids) * eval_n)
    row["eval_samples_per_s"] = sum(len(c) for c in done) / (time.perf_counter() - t0)
    if model == "toy":
        greedy = eng.generate(ids, SamplingParams(max_new_tokens, greedy=True))
        ids_BT, valid_BT = greedy.completion_ids_BT.tolist(), greedy.completion_BT.tolist()
        row["greedy_rows"] = [[t for t, v in zip(r, m) if v] for r, m in zip(ids_BT, valid_BT)]
    eng.close()
    return row


def add_arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", default=None, choices=["toy", *MODELS], help="default: toy qwen3-mini")
    parser.add_argument("--prompts", type=positive_int, default=32, help="rollouts per generate call")
    parser.add_argument("--prompt-len", type=positive_int, default=64, help="prompt tokens (random models)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed generate calls after a warm-up")
    parser.add_argument("--eval-n", type=positive_int, default=4, help="samples per prompt in the eval measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache-dir", default=None, help="toy pair cache (default: POWEROPD_CACHE or ~/.cache)")


def describe(args, device: str) -> str:
    models = args.models or (["toy", "qwen3-mini"] if device == "cpu" else ["toy", "qwen3-0.6b"])
    return (
        f"{', '.join(models)} on {device}; {args.prompts} rollouts per call, up to {args.max_new_tokens} new "
        f"tokens, T 1; median of {args.repeats} calls after a warm-up; eval: {args.eval_n} samples per prompt "
        "at T 0.6 / top_p 0.95 / top_k 20; each (model, engine) in its own process"
    )


def run(args, device: str) -> list[dict]:
    from poweropd.bench.common import run_isolated
    from poweropd.vllm_engine import import_vllm

    import_vllm()  # one line naming the install if vLLM is missing
    models = args.models or (["toy", "qwen3-mini"] if device == "cpu" else ["toy", "qwen3-0.6b"])
    rows = []
    for model in models:
        pair = {}
        for engine in ("hf", "vllm"):
            kwargs = dict(
                model=model,
                engine=engine,
                prompts=args.prompts,
                prompt_len=args.prompt_len,
                max_new_tokens=args.max_new_tokens,
                repeats=args.repeats,
                eval_n=args.eval_n,
                threads=args.threads,
                cache_dir=args.cache_dir,
                device=device,
            )
            pair[engine] = run_isolated("poweropd.bench.rollout:measure", kwargs)
            print(f"{model} {engine}: {pair[engine]}"[:300], flush=True)
        hf_rows, vllm_rows = pair["hf"].pop("greedy_rows", None), pair["vllm"].pop("greedy_rows", None)
        if hf_rows is not None and vllm_rows is not None:
            same = sum(a == b for a, b in zip(hf_rows, vllm_rows))
            pair["vllm"]["greedy_identical"] = f"{same}/{len(hf_rows)}"
        rows += [pair["hf"], pair["vllm"]]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | engine | rollout tokens/s | vs HF | mean rollout length | start-up (s) | sync per update (s) "
        "| eval samples/s | greedy rollouts identical to HF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    hf = {r["model"]: r for r in rows if r.get("engine") == "hf" and "tokens_per_s" in r}
    for r in rows:
        if "skipped" in r:
            lines.append(f"| ? | ? | skipped: {r['skipped']} | | | | | | |")
            continue
        base = hf.get(r["model"])
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        lines.append(
            f"| {r['model']} | {r['engine']} | {r['tokens_per_s']:.0f} | {fmt(ratio, 2, 'x')} | "
            f"{r['mean_rollout_tokens']:.1f} | {fmt(r['startup_s'], 1)} | {fmt(r.get('sync_s'), 3)} | "
            f"{r['eval_samples_per_s']:.1f} | {r.get('greedy_identical', '-')} |"
        )
    return "\n".join(lines)
