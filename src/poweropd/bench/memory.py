"""Benchmark 7: memory per process under data parallel (training.parallel=ddp) and FSDP2
(training.parallel=fsdp2) at N processes - a model, and a check of it against measured RSS.

The model (bytes per process; P = parameters, N = processes, c = the compute dtype's bytes:
4 in fp32, 2 under bf16; the teacher's weights take its own dtype's bytes t):

    student state   ddp: 16 P_s            fp32 master weights 4 + fp32 gradients 4 + AdamW m, v 8,
                                           + 4 P_s at N > 1 (DDP's gradient buckets, a second copy)
                    fsdp2: 16 P_s / N      (training.fsdp.cpu_offload moves it to host memory)
    teacher         ddp: t P_t             frozen, no gradients, no optimizer state
                    fsdp2: t P_t / N
    gathered        fsdp2 only, while the update runs: the root unit (embeddings, lm-head, final
                    norm) and two decoder layers (the one running and the one prefetched), in c,
                    plus their fp32 gradients before the reduce-scatter; the teacher's root and
                    two layers while it scores. While the hf engine generates, the whole student
                    is gathered in c (poweropd.sharding.gathered_for_generation).
    activations     the same per process under both (each process runs its own micro-batch):
                    per token and student layer about 4 d + 5 q + 4 kv + 4 m values in c saved for
                    the backward (q = heads x head_dim, kv = kv_heads x head_dim, m = MLP width),
                    plus the lm-head kernels' fp32 [chunk, V] buffers (two).
    loading         host memory at start-up: s P_s + t P_t (s the student's load dtype) in every
                    process under ddp; under fsdp2 only in the main process, which reads both
                    models and broadcasts each process its shards (the others build theirs on
                    the meta device and read no weights).

On a GPU the GPU's peak is the larger of the updating and generating phases; on a CPU, where
everything is one RSS, the peak is the largest of the three. `--measure` runs the
trainer's own setup and updates (poweropd.train) in fresh processes on random
Qwen3-architecture models sized so that weights and optimizer state dominate, at 1 process
(ddp) and 2 processes (ddp, fsdp2) over gloo, two updates each (the second one generates with
AdamW's state allocated), and sets each process's measured peak RSS above its RSS before any
model loaded beside the model's peak. The workers run with a fixed glibc mmap threshold
(MALLOC_MMAP_THRESHOLD_), so that memory torch has released leaves the RSS.

    python -m poweropd.bench memory                        # the table for the paper's pairs and 8B <- 32B
    python -m poweropd.bench memory --measure --cpu        # + the CPU check (about two minutes)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from poweropd.bench.common import fmt, positive_int
from poweropd.flops import QWEN3, Arch

GIB = 2**30

# Qwen3 models the table needs beyond poweropd.flops (public config values; tied = one tensor
# for the embeddings and the lm-head).
ARCHS = {
    **QWEN3,
    "Qwen/Qwen3-8B-Base": QWEN3["Qwen/Qwen3-8B"],
    "Qwen/Qwen3-32B": Arch(5120, 64, 25600, 64, 8, 128, 151936),
}
UNTIED = {"Qwen/Qwen3-8B", "Qwen/Qwen3-8B-Base", "Qwen/Qwen3-32B"}

PAIRS = {
    "qwen3_4b_0.6b": ("Qwen/Qwen3-4B", "Qwen/Qwen3-0.6B-Base"),
    "qwen3_4b_1.7b": ("Qwen/Qwen3-4B", "Qwen/Qwen3-1.7B-Base"),
    "qwen3_8b_0.6b": ("Qwen/Qwen3-8B", "Qwen/Qwen3-0.6B-Base"),
    "qwen3_8b_1.7b": ("Qwen/Qwen3-8B", "Qwen/Qwen3-1.7B-Base"),
    "8b_from_32b": ("Qwen/Qwen3-32B", "Qwen/Qwen3-8B-Base"),
}


@dataclass(frozen=True)
class Params:
    """Parameter counts of one model, by FSDP unit."""

    root: int  # embeddings (+ lm-head when untied) + final norm
    layer: int  # one decoder layer
    layers: int

    @property
    def total(self) -> int:
        return self.root + self.layer * self.layers


def count_params(arch: Arch, tied: bool = True) -> Params:
    d, q, kv, m = arch.hidden, arch.heads * arch.head_dim, arch.d_kv, arch.intermediate
    layer = d * q + 2 * d * kv + q * d + 3 * d * m + 2 * arch.head_dim + 2 * d  # attention, MLP, norms
    root = arch.vocab * d * (1 if tied else 2) + d
    return Params(root, layer, arch.layers)


def activation_bytes(arch: Arch, tokens: int, compute: int, chunk: int) -> int:
    """What one micro-batch of `tokens` tokens keeps for the student's backward (an estimate)."""
    d, q, kv, m = arch.hidden, arch.heads * arch.head_dim, arch.d_kv, arch.intermediate
    per_token_layer = 4 * d + 5 * q + 4 * kv + 4 * m
    return tokens * arch.layers * per_token_layer * compute + 2 * min(chunk, tokens) * arch.vocab * 4


def predict(
    student: Params,
    teacher: Params,
    processes: int,
    parallel: str,
    compute: int = 4,
    teacher_bytes: int = 2,
    student_load: int = 4,
    activations: int = 0,
) -> dict:
    """Bytes per process by phase (see the module docstring)."""
    n = processes if parallel == "fsdp2" else 1
    state = 16 * student.total / n
    if parallel == "ddp" and processes > 1:
        state += 4 * student.total  # DDP's gradient buckets
    teacher_w = teacher_bytes * teacher.total / n
    gathered_update = gathered_scoring = gathered_generation = 0.0
    if parallel == "fsdp2":
        gathered_update = (compute + 4) * (student.root + 2 * student.layer)
        gathered_scoring = teacher_bytes * (teacher.root + 2 * teacher.layer)
        gathered_generation = compute * student.total
    loading = student_load * student.total + teacher_bytes * teacher.total  # the main process's
    update = state + teacher_w + max(gathered_update + activations, gathered_scoring)
    generate = state + teacher_w + gathered_generation
    return {
        "student_state_gb": state / GIB,
        "teacher_gb": teacher_w / GIB,
        "gathered_gb": max(gathered_update, gathered_scoring, gathered_generation) / GIB,
        "activations_gb": activations / GIB,
        "loading_gb": loading / GIB,  # host memory on a GPU machine (from_pretrained reads into it)
        "update_gb": update / GIB,
        "generate_gb": generate / GIB,
        "device_peak_gb": max(update, generate) / GIB,  # on a GPU: what the GPU must hold
        "peak_gb": max(loading, update, generate) / GIB,  # on a CPU: everything is the one RSS
    }


def disk_rows(save_every: int = 100, steps: int = 1500) -> list[dict]:
    """Disk a run of each pair's student takes (poweropd.checkpoint): a checkpoint holds the fp32
    student once (4 bytes per parameter) and AdamW's two fp32 moments (8); `student/` at the end
    is the fp32 student. A run writes a checkpoint every save_every updates before the last
    one (the last writes student/): (steps - 1) // save_every of them, of which
    training.keep_checkpoints (1 by default) stay; while one is written, one more is on disk."""
    rows, seen = [], set()
    for _teacher, student_id in PAIRS.values():
        if student_id in seen:
            continue
        seen.add(student_id)
        s = count_params(ARCHS[student_id], tied=student_id not in UNTIED).total
        rows.append({
            "kind": "disk", "student": student_id, "student_b": s / 1e9, "checkpoint_gb": 12 * s / 1e9,
            "student_gb": 4 * s / 1e9, "steps": steps, "save_every": save_every,
            "checkpoints_written": (steps - 1) // save_every, "all_kept_gb": (steps - 1) // save_every * 12 * s / 1e9,
        })  # fmt: skip
    return rows


def model_rows(processes: list[int], tokens: int, chunk: int) -> list[dict]:
    """The table for the paper's pairs and 8B <- 32B on GPUs: bf16 compute and teacher."""
    rows = []
    for name, (teacher_id, student_id) in PAIRS.items():
        t = count_params(ARCHS[teacher_id], tied=teacher_id not in UNTIED)
        s = count_params(ARCHS[student_id], tied=student_id not in UNTIED)
        acts = activation_bytes(ARCHS[student_id], tokens, 2, chunk)
        for n in processes:
            for parallel in ("ddp", "fsdp2"):
                row = {"pair": name, "processes": n, "parallel": parallel, "student_b": s.total / 1e9}
                row["teacher_b"] = t.total / 1e9
                row.update(predict(s, t, n, parallel, compute=2, teacher_bytes=2, activations=acts))
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------
# The CPU check: the trainer's own setup and two updates, peak RSS per process

MEASURE_TEACHER = Arch(1024, 12, 3072, 16, 4, 64, 128)  # 152M parameters
MEASURE_STUDENT = Arch(768, 12, 2048, 12, 4, 64, 128)  # 73M parameters


def _save_random(arch: Arch, folder: Path, seed: int) -> None:
    import torch

    from poweropd.bench.step import build_model
    from poweropd.toy.shipped import SHIPPED_DIR

    build_model(arch, torch.float32, "cpu", seed).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        source = SHIPPED_DIR / "student" / name
        if source.is_file():
            shutil.copy(source, folder / name)


def measure_worker(teacher: str, student: str, parallel: str, out: str) -> None:
    """One process of the check (run under torchrun for 2): setup, two updates, peak RSS."""
    import torch

    from poweropd.bench.common import peak_rss_bytes, rss_now_bytes
    from poweropd.config import Config, ModelPairConfig, RewardConfig, TrainingConfig
    from poweropd.train import make_accelerator, opd_update, sample_rollouts, setup_run, training_sampling

    torch.set_num_threads(1)
    base = rss_now_bytes()
    cfg = Config(
        model_pair=ModelPairConfig(name="memory", kind="hf", teacher=teacher, student=student),
        reward=RewardConfig(name="vanilla"),
        training=TrainingConfig(
            batch_size=4, max_new_tokens=16, val_data="none", reward_dump_prompts=0, parallel=parallel
        ),
    )
    acc = make_accelerator(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        run = setup_run(cfg, Path(tmp) / "run", acc)
        for _ in range(2):  # the second update generates and updates with AdamW's state allocated
            rows = run.sampler.next_batch(cfg.training.batch_size // acc.num_processes)
            rollouts = sample_rollouts(run, rows, training_sampling(cfg.training))
            metrics, _ = opd_update(run, rollouts)
        run.grader.close()
    result = {"rank": acc.process_index, "base_gb": base / GIB, "peak_gb": peak_rss_bytes() / GIB}
    result["tokens"] = int(rollouts.attention_mask_BS.sum())
    gathered = [None] * acc.num_processes
    if acc.num_processes > 1:
        import torch.distributed as dist

        dist.all_gather_object(gathered, result)
    else:
        gathered = [result]
    if acc.is_main_process:
        Path(out).write_text(json.dumps({"processes": acc.num_processes, "ranks": gathered, "loss": metrics["loss"]}))


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def measure_rows() -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        _save_random(MEASURE_TEACHER, root / "teacher", seed=0)
        _save_random(MEASURE_STUDENT, root / "student", seed=1)
        t, s = count_params(MEASURE_TEACHER), count_params(MEASURE_STUDENT)
        rows = []
        for processes, parallel in ((1, "ddp"), (2, "ddp"), (2, "fsdp2")):
            out = root / f"{parallel}{processes}.json"
            code = "from poweropd.bench.memory import measure_worker as w; import sys; w(*sys.argv[1:])"
            script = root / "worker.py"
            script.write_text(code)
            launch = [sys.executable] if processes == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", _free_port(),
            ]  # fmt: skip
            # A fixed mmap threshold: glibc's adaptive one keeps freed all-gather buffers in the heap,
            # and the RSS high-water mark would then count memory torch has already released.
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
            cmd = [*launch, str(script), str(root / "teacher"), str(root / "student"), parallel, str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                rows.append({"processes": processes, "parallel": parallel, "skipped": done.stderr[-300:]})
                continue
            measured = json.loads(out.read_text())
            tokens = max(r["tokens"] for r in measured["ranks"])
            acts = activation_bytes(MEASURE_STUDENT, tokens, 4, 1024)
            model = predict(s, t, processes, parallel, compute=4, teacher_bytes=4, activations=acts)
            for rank in measured["ranks"]:
                rows.append(
                    {
                        "processes": processes,
                        "parallel": parallel,
                        "rank": rank["rank"],
                        "measured_gb": rank["peak_gb"] - rank["base_gb"],
                        "base_gb": rank["base_gb"],
                        **{f"model_{k}": v for k, v in model.items()},
                    }
                )
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# The benchmark interface (python -m poweropd.bench memory)


def add_arguments(p) -> None:
    p.add_argument("--processes", default="1,8", help="process counts of the model table (comma-separated)")
    p.add_argument("--tokens", type=positive_int, default=1152, help="tokens per micro-batch (1 rollout: 128 + 1024)")
    p.add_argument("--chunk", type=positive_int, default=1024, help="training.logprob_chunk_size")
    p.add_argument("--measure", action="store_true", help="also check the model against measured RSS (CPU)")


def run(args, device: str) -> list[dict]:
    counts = [int(x) for x in str(args.processes).split(",") if x.strip()]
    rows = [{"kind": "model", **r} for r in model_rows(counts, args.tokens, args.chunk)] + disk_rows()
    if args.measure:
        rows += [{"kind": "measured", **r} for r in measure_rows()]
    return rows


def table(rows: list[dict]) -> str:
    model = [r for r in rows if r["kind"] == "model"]
    lines = [
        "Predicted GiB per process on GPUs (bf16 compute and teacher, fp32 master weights + AdamW):",
        "",
        "| pair | N | parallel | student state | teacher | gathered | activations | GPU peak | host at load (main) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in model:
        lines.append(
            f"| {r['pair']} | {r['processes']} | {r['parallel']} | {fmt(r['student_state_gb'])} | "
            f"{fmt(r['teacher_gb'])} | {fmt(r['gathered_gb'])} | {fmt(r['activations_gb'])} | "
            f"{fmt(r['device_peak_gb'])} | {fmt(r['loading_gb'])} |"
        )
    disk = [r for r in rows if r["kind"] == "disk"]
    lines += [
        "",
        "Disk per checkpoint (GB = 1e9 bytes; the fp32 student once + AdamW's moments, 12 bytes per parameter):",
        "",
        "| student | parameters (B) | one checkpoint | student/ | every checkpoint kept |",
        "|---|---|---|---|---|",
    ]
    for r in disk:
        lines.append(
            f"| {r['student']} | {fmt(r['student_b'])} | {fmt(r['checkpoint_gb'], 1)} GB | "
            f"{fmt(r['student_gb'], 1)} GB | {fmt(r['all_kept_gb'], 0)} GB ({r['checkpoints_written']} checkpoints: "
            f"{r['steps']} steps, save_every {r['save_every']}) |"
        )
    measured = [r for r in rows if r["kind"] == "measured"]
    if measured:
        lines += [
            "",
            "CPU check (fp32, 152M teacher, 73M student, two updates): peak RSS above the RSS before any model",
            "loaded, per process, against the model's peak:",
            "",
            "| N | parallel | rank | measured GiB | model GiB | measured / model |",
            "|---|---|---|---|---|---|",
        ]
        for r in measured:
            if "skipped" in r:
                lines.append(f"| {r['processes']} | {r['parallel']} | - | failed: {r['skipped'][-80:]} | | |")
                continue
            ratio = r["measured_gb"] / r["model_peak_gb"]
            lines.append(
                f"| {r['processes']} | {r['parallel']} | {r['rank']} | {fmt(r['measured_gb'])} | "
                f"{fmt(r['model_peak_gb'])} | {fmt(ratio)} |"
            )
    return "\n".join(lines)


def describe(args, device: str) -> str:
    return f"memory model: processes {args.processes}, {args.tokens} tokens per micro-batch, chunk {args.chunk}" + (
        "; measuring on the CPU" if args.measure else ""
    )
