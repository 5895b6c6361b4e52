"""Benchmarks 2 and 4: whole OPD updates through the harness on a random-initialised
Qwen3-architecture pair with the Qwen3 vocabulary.

`step` (benchmark 2): one full OPD step, sampled-token (PowerOPD) vs full-vocab, on the
same rollouts: generation (harness `generate`, KV-cached, batched), teacher scoring,
student forward/backward and the optimizer step, each method in its own process.

`scaling` (benchmark 4): the update (teacher + student + optimizer, on fixed-length
rollouts) as the response length doubles and as the batch doubles, beside the FLOPs
the update executes by the paper's Appendix B model plus the lm-head matmuls the kernels
run (teacher 2NdV, student 3 x 2NdV), so that any growth the model does not predict
(a hidden quadratic term from the harness) shows up as a rising seconds-per-TFLOP.

Weights are random: the numbers measure cost, not quality. `--shapes mini` (the CPU
default) keeps the Qwen3 vocabulary with a small body; `--shapes qwen3-4b-0.6b` is the
paper's Table 4 pair at full size (a GPU job).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from poweropd.bench.common import QWEN3_VOCAB, PeakMemory, fmt, non_negative_int, positive_int, run_isolated
from poweropd.flops import QWEN3, Arch, update_flops

# (teacher, student)
SHAPES = {
    "mini": (Arch(512, 4, 1536, 8, 2, 64, QWEN3_VOCAB), Arch(256, 4, 768, 4, 2, 64, QWEN3_VOCAB)),
    "tiny": (Arch(64, 1, 128, 2, 1, 32, 2048), Arch(32, 1, 64, 2, 1, 16, 2048)),  # for tests
    "qwen3-4b-0.6b": (QWEN3["Qwen/Qwen3-4B"], QWEN3["Qwen/Qwen3-0.6B-Base"]),
    "qwen3-8b-1.7b": (QWEN3["Qwen/Qwen3-8B"], QWEN3["Qwen/Qwen3-1.7B-Base"]),
}


def build_model(arch: Arch, dtype: torch.dtype, device: str, seed: int):
    from transformers import AutoModelForCausalLM, Qwen3Config

    conf = Qwen3Config(
        vocab_size=arch.vocab,
        hidden_size=arch.hidden,
        num_hidden_layers=arch.layers,
        intermediate_size=arch.intermediate,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype, attn_implementation="sdpa")
    return model


def mini_pair(shapes: str, device: str, seed: int = 0):
    """A ModelPair of random-initialised Qwen3-architecture models (no tokenizer needed)."""
    from poweropd.hf_engine import neutralize_generation_defaults
    from poweropd.models import ModelPair

    teacher_arch, student_arch = SHAPES[shapes]
    on_gpu = device == "cuda"
    teacher = build_model(teacher_arch, torch.bfloat16 if on_gpu else torch.float32, device, seed)
    student = build_model(student_arch, torch.float32, device, seed + 1)
    teacher.eval().requires_grad_(False)
    student.train()
    for model in (teacher, student):
        neutralize_generation_defaults(model)
    stop = teacher_arch.vocab - 1
    return ModelPair(teacher, student, None, [stop], 0, f"random {shapes} teacher", f"random {shapes} student")


def bench_run(pair, reward: str, batch: int, response: int, chunk: int, micro: int, grad_ckpt: bool):
    """A harness Run around `pair`: the trainer's accelerator, scorer and AdamW."""
    from poweropd.config import Config, RewardConfig, TrainingConfig
    from poweropd.engines import make_engine
    from poweropd.models import StudentScorer
    from poweropd.train import Run, make_accelerator

    cfg = Config(
        reward=RewardConfig(name=reward, alpha=5.0),
        training=TrainingConfig(
            batch_size=batch,
            max_new_tokens=response,
            logprob_chunk_size=chunk,
            micro_batch_size=micro,
            gradient_checkpointing=grad_ckpt,
            val_data="none",
        ),
    )
    acc = make_accelerator(cfg)
    if grad_ckpt:
        pair.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    scorer = StudentScorer(pair.student, chunk)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-6)
    scorer, optimizer = acc.prepare(scorer, optimizer)
    engine = make_engine("hf", stop_ids=pair.stop_ids, pad_id=pair.pad_id, model=pair.student, autocast=acc.autocast)
    from poweropd.teachers import HFTeacher

    teacher = HFTeacher(pair.teacher)
    return Run(cfg, Path(tempfile.mkdtemp()), acc, pair, scorer, optimizer, None, [], None, None, engine, teacher)


def fixed_rollouts(batch: int, prompt: int, response: int, vocab: int, device: str, seed: int = 0):
    """Full-length rollouts of random tokens (no stop token): every row has `response` tokens."""
    from poweropd.generation import Rollouts

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 1, (batch, prompt + response), generator=gen)
    return Rollouts(
        ids.to(device),
        torch.ones_like(ids).to(device),
        prompt,
        torch.ones(batch, response, dtype=torch.bool, device=device),
        torch.zeros(batch, dtype=torch.bool, device=device),
    )


def case(
    reward: str,
    shapes: str,
    batch: int,
    prompt: int,
    response: int,
    chunk: int,
    micro: int,
    repeats: int,
    device: str,
    generate_rollouts: bool,
    grad_ckpt: bool = False,
) -> dict:
    """One method at one size, in its own process: median step time by phase, peak memory."""
    from poweropd.generation import SamplingParams
    from poweropd.hf_engine import generate
    from poweropd.stats import StepClock
    from poweropd.train import opd_update

    pair = mini_pair(shapes, device)
    run = bench_run(pair, reward, batch, response, chunk, micro, grad_ckpt)
    fixed = fixed_rollouts(batch, prompt, response, SHAPES[shapes][1].vocab, device)
    prompts = fixed.input_ids_BS[:, :prompt].tolist()

    def one_step() -> dict:
        clock = StepClock(torch.device(device))
        rollouts = fixed
        if generate_rollouts:
            torch.manual_seed(1)  # the same rollouts for every method
            rollouts = generate(run.student, prompts, SamplingParams(response), pair.stop_ids, pair.pad_id)
        clock.lap("generate")
        metrics, _ = opd_update(run, rollouts, clock)
        return metrics

    memory = PeakMemory(device)
    memory.start()
    one_step()  # warm-up, and the optimizer's state
    steps = [one_step() for _ in range(repeats)]

    def median(key: str) -> float:
        return statistics.median(s[key] for s in steps)

    teacher, student = SHAPES[shapes]
    parts = update_flops(teacher, student, batch, prompt, response)
    return {
        "reward": reward,
        "batch": batch,
        "response": response,
        "n_tokens": steps[-1]["n_tokens"],
        "n_generated": steps[-1]["n_generated"],
        "step_s": median("step_time"),
        "generate_s": median("time/generate"),
        "teacher_s": median("time/teacher"),
        "student_s": median("time/student"),
        "optimizer_s": median("time/optimizer"),
        "update_s": statistics.median(s["step_time"] - s["time/generate"] for s in steps),
        "executed_tflops": (parts["sampled_token"] + parts["teacher_head"] + parts["student_head"]) / 1e12,
        **memory.result(),
    }


def _case_kwargs(args, device: str, reward: str, batch: int, response: int, generate_rollouts: bool) -> dict:
    """Arguments of `case` for one method and size, the rest from the command line."""
    return dict(
        reward=reward,
        shapes=args.shapes,
        batch=batch,
        prompt=args.prompt,
        response=response,
        chunk=args.chunk,
        micro=args.micro,
        repeats=args.repeats,
        device=device,
        generate_rollouts=generate_rollouts,
        grad_ckpt=args.gradient_checkpointing,
    )


# ----------------------------------------------------------------------------------------
# benchmark 2: sampled-token vs full-vocab


def run_step(args, device: str) -> list[dict]:
    rows = []
    for reward in ("power", "full_vocab"):
        kwargs = _case_kwargs(args, device, reward, args.batch, args.response, not args.no_generate)
        rows.append({"reward": reward, **run_isolated("poweropd.bench.step:case", kwargs)})
        print(_step_line(rows[-1]), flush=True)
    return rows


def _step_line(row: dict) -> str:
    if "skipped" in row:
        return f"{row['reward']:>10}  skipped: {row['skipped']}"
    return (
        f"{row['reward']:>10}  step {row['step_s']:.3f} s (update {row['update_s']:.3f} s)  "
        f"peak {row['peak_mem_gb']:.2f} GB (+{row['growth_mem_gb']:.2f} GB)"
    )


STEP_COLUMNS = [
    ("step (s)", "step_s", 3),
    ("generate (s)", "generate_s", 3),
    ("teacher (s)", "teacher_s", 3),
    ("student fwd+bwd (s)", "student_s", 3),
    ("optimizer (s)", "optimizer_s", 3),
    ("update (s)", "update_s", 3),
    ("peak mem (GB)", "peak_mem_gb", 2),
    ("mem over models (GB)", "growth_mem_gb", 2),
]


def step_table(rows: list[dict]) -> str:
    names = {"power": "sampled-token (PowerOPD)", "full_vocab": "full-vocab"}
    head = ["method"] + [c[0] for c in STEP_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {r["reward"]: r for r in rows}
    for reward in ("power", "full_vocab"):
        row = by.get(reward)
        if row is None:
            continue
        if "skipped" in row:
            lines.append(f"| {names[reward]} | skipped ({row['skipped']}) |" + " |" * (len(head) - 2))
            continue
        lines.append("| " + " | ".join([names[reward]] + [fmt(row[k], d) for _, k, d in STEP_COLUMNS]) + " |")
    s, f = by.get("power"), by.get("full_vocab")
    if s and f and "skipped" not in s and "skipped" not in f:
        cells = [f"{s[k] / f[k]:.2f}x" if f[k] > 0 else "-" for _, k, _ in STEP_COLUMNS]
        lines.append("| sampled / full-vocab | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# benchmark 4: scaling


def run_scaling(args, device: str) -> list[dict]:
    series = [("length", args.batch, t) for t in args.lengths] + [("batch", b, args.response) for b in args.batches]
    rows = []
    for name, batch, response in series:
        kwargs = _case_kwargs(args, device, args.reward, batch, response, generate_rollouts=False)
        rows.append(
            {"series": name, "batch": batch, "response": response, **run_isolated("poweropd.bench.step:case", kwargs)}
        )
        row = rows[-1]
        print(f"{name:>7} B={batch:<3} T={response:<5} " + _step_line(row), flush=True)
    return rows


def scaling_table(rows: list[dict]) -> str:
    """Each series against its first row: time and FLOPs grow by the same factor when the
    harness adds no cost of its own (seconds per TFLOP stays flat)."""
    head = [
        "series",
        "B",
        "T",
        "tokens",
        "update (s)",
        "peak mem (GB)",
        "model TFLOPs",
        "time x",
        "FLOPs x",
        "time x / FLOPs x",
        "s per TFLOP",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for series in ("length", "batch"):
        group = [r for r in rows if r["series"] == series]
        first = next((r for r in group if "skipped" not in r), None)
        for r in group:
            if "skipped" in r:
                lines.append(f"| {series} | {r['batch']} | {r['response']} | skipped ({r['skipped']}) |" + " |" * 7)
                continue
            time_x = r["update_s"] / first["update_s"]
            flops_x = r["executed_tflops"] / first["executed_tflops"]
            cells = [
                series,
                str(r["batch"]),
                str(r["response"]),
                str(r["n_tokens"]),
                fmt(r["update_s"], 3),
                fmt(r["peak_mem_gb"], 2),
                fmt(r["executed_tflops"], 3),
                f"{time_x:.2f}",
                f"{flops_x:.2f}",
                f"{time_x / flops_x:.2f}",
                fmt(r["update_s"] / r["executed_tflops"], 2),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_common_arguments(parser) -> None:
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="mini")
    parser.add_argument("--prompt", type=positive_int, default=64, help="prompt tokens per rollout")
    parser.add_argument("--chunk", type=positive_int, default=1024, help="tokens per lm-head chunk")
    parser.add_argument("--micro", type=non_negative_int, default=0, help="rollouts per forward/backward (0 = all)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")


def add_step_arguments(parser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--batch", type=positive_int, default=8, help="rollouts per update")
    parser.add_argument("--response", type=positive_int, default=256, help="response tokens per rollout")
    parser.add_argument("--no-generate", action="store_true", help="time the update on fixed rollouts only")


def add_scaling_arguments(parser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--reward", choices=("power", "full_vocab"), default="power")
    parser.add_argument("--batch", type=positive_int, default=4, help="batch of the length series")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--response", type=positive_int, default=256, help="response length of the batch series")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[4, 8, 16])


def describe(args, device: str) -> str:
    teacher, student = SHAPES[args.shapes]
    return (
        f"random-initialised Qwen3-architecture pair `{args.shapes}`: teacher d={teacher.hidden} L={teacher.layers} "
        f"m={teacher.intermediate}, student d={student.hidden} L={student.layers} m={student.intermediate}, "
        f"vocabulary {student.vocab:,}; prompt {args.prompt} tokens, lm-head chunks of {args.chunk}; "
        f"teacher {'bf16' if device == 'cuda' else 'fp32'}, student fp32 master weights"
        f"{' + bf16 autocast' if device == 'cuda' else ''}; median of {args.repeats} after a warm-up, one process "
        "per case; peak = " + ("CUDA max allocated" if device == "cuda" else "the process's peak RSS")
    )
