"""Benchmark 6: where the teacher runs (model_pair.teacher_backend) - HF in the trainer, an
in-process vLLM engine, or a vLLM server.

Each case is a trainer-like process that holds the student (random Qwen3-architecture
weights, as in `step`) and scores the same random rollouts with the teacher: the sampled
token's log-prob (k = 0) or also the top-k (k > 0), through the trainer's own code path
(poweropd.teachers). Per row: loss tokens scored per second (median of timed repeats after a
warm-up), the peak RSS of that process (its high-water mark: each case runs in a fresh one)
and, for the server, the peak RSS of the server's processes (launched with
`python -m poweropd.serve teacher`, the launcher users run).

    mini           teacher: Qwen3 vocabulary (151,936), hidden 512, 4 layers; student hidden 256
    qwen3-4b-0.6b  the paper's Qwen3-4B / Qwen3-0.6B shapes (a GPU job)
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from poweropd.bench.common import fmt, peak_rss_bytes, positive_int, rss_now_bytes

BACKENDS = ("hf", "vllm", "server")


def save_teacher(shapes: str, device: str) -> str:
    from poweropd.bench.step import SHAPES, build_model

    teacher_arch, _ = SHAPES[shapes]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    folder = tempfile.mkdtemp(prefix="bench_teacher_")
    build_model(teacher_arch, dtype, "cpu", seed=0).save_pretrained(folder)
    return folder


def measure(
    backend: str,
    shapes: str,
    folder: str,
    url: str,
    rollouts: int,
    prompt_len: int,
    completion_len: int,
    k: int,
    repeats: int,
    threads: int,
    device: str,
) -> dict:
    """One backend's measurement; runs in its own process."""
    from transformers import AutoModelForCausalLM

    from poweropd.bench.step import SHAPES, build_model
    from poweropd.config import TeacherServerConfig, VLLMConfig
    from poweropd.teachers import HFTeacher, ServerTeacher, VLLMTeacher

    if threads:
        torch.set_num_threads(threads)
    teacher_arch, student_arch = SHAPES[shapes]
    student = build_model(student_arch, torch.float32, device, seed=1)  # what the trainer holds anyway
    with_student = rss_now_bytes()
    dtype = "bfloat16" if device == "cuda" else "float32"
    if backend == "hf":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
        teacher = HFTeacher(model.requires_grad_(False))
    elif backend == "vllm":
        options = VLLMConfig(gpu_memory_utilization=0.3)
        teacher = VLLMTeacher(folder, dtype=dtype, k=k, seed=0, trust_remote_code=False, options=options)
    else:
        teacher = ServerTeacher(url, TeacherServerConfig())
        teacher.client.connect()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, teacher_arch.vocab, (rollouts, prompt_len + completion_len), generator=gen).to(device)
    inputs = (
        ids,
        torch.ones_like(ids),
        prompt_len,
        torch.ones(rollouts, completion_len, dtype=torch.bool, device=device),
    )
    need = "topk" if k else "logprobs"

    def score():
        out = teacher.score(need, [inputs], chunk=1024, k=k)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    score()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        score()
        times.append(time.perf_counter() - t0)
    tokens = rollouts * completion_len
    row = {
        "shapes": shapes,
        "backend": backend,
        "k": k,
        "rollouts": rollouts,
        "tokens_per_update": tokens,
        "tokens_per_s": tokens / statistics.median(times),
        "rss_before_teacher_gb": with_student / 2**30,
        "peak_rss_gb": peak_rss_bytes() / 2**30,
    }
    if device == "cuda":
        row["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    teacher.close()
    del student
    return row


def process_tree_peak_gb(pid: int) -> float:
    """Sum of the peak RSS (VmHWM) of `pid` and all its descendants."""

    def children(p: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{p}/task").glob("*"):
            text = (task / "children").read_text() if (task / "children").exists() else ""
            out += [int(c) for c in text.split()]
        return out

    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
            todo += children(p)
        except OSError:
            continue
    return total / 2**30


def start_server(folder: str, port: int, device: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "poweropd.serve", "teacher", "model_pair.kind=hf", f"model_pair.teacher={folder}"]
    cmd += [f"model_pair.student={folder}", "--port", str(port)]
    if device == "cpu":
        cmd += ["--kv-cache-gib", "1"]
    else:  # the scoring process holds the student on the same GPU
        cmd += ["--gpu-memory-utilization", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("teacher served at"):
            return proc
        if not line and proc.poll() is not None:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("the teacher server did not start (python -m poweropd.serve teacher)")


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", default=None, help="mini (CPU default) | qwen3-4b-0.6b (GPU default)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--rollouts", type=positive_int, default=16, help="rollouts scored per update")
    parser.add_argument("--prompt-len", type=positive_int, default=64)
    parser.add_argument("--completion-len", type=positive_int, default=192)
    parser.add_argument("--k", type=int, default=0, help="top-k log-probs as well (topk_kl); 0: sampled token only")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of the scoring process")
    parser.add_argument("--port", type=positive_int, default=8321)


def _shapes(args, device: str) -> str:
    return args.shapes or ("mini" if device == "cpu" else "qwen3-4b-0.6b")


def describe(args, device: str) -> str:
    return (
        f"{_shapes(args, device)} shapes on {device}; {args.rollouts} rollouts of {args.prompt_len} prompt + "
        f"{args.completion_len} completion tokens per update, k={args.k}; median of {args.repeats} updates after a "
        "warm-up; each backend in its own process, which also holds the student"
    )


def run(args, device: str) -> list[dict]:

    shapes = _shapes(args, device)
    folder = save_teacher(shapes, device)
    rows = []
    for backend in args.backends:
        kwargs = dict(
            backend=backend,
            shapes=shapes,
            folder=folder,
            url=f"http://127.0.0.1:{args.port}",
            rollouts=args.rollouts,
            prompt_len=args.prompt_len,
            completion_len=args.completion_len,
            k=args.k,
            repeats=args.repeats,
            threads=args.threads,
            device=device,
        )
        row = measure_backend(kwargs, args.port)
        print(f"{backend}: {row}"[:300], flush=True)
        rows.append(row)
    return rows


def measure_backend(kwargs: dict, port: int) -> dict:
    """`measure(**kwargs)` in its own process; for the server backend, with a server started
    on `port` for it (its process tree's peak RSS added) and killed afterwards."""
    from poweropd.bench.common import run_isolated

    server = start_server(kwargs["folder"], port, kwargs["device"]) if kwargs["backend"] == "server" else None
    try:
        row = run_isolated("poweropd.bench.teacher:measure", kwargs)
        if server is not None:
            row["server_peak_rss_gb"] = process_tree_peak_gb(server.pid)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| backend | k | loss tokens scored/s | vs HF | trainer peak RSS (GB) | trainer RSS before the teacher (GB) "
        "| server peak RSS (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    hf = next((r for r in rows if r.get("backend") == "hf" and "tokens_per_s" in r), None)
    for r in rows:
        if "skipped" in r:
            lines.append(f"| ? | | skipped: {r['skipped']} | | | | |")
            continue
        ratio = r["tokens_per_s"] / hf["tokens_per_s"] if hf else None
        lines.append(
            f"| {r['backend']} | {r['k']} | {r['tokens_per_s']:.0f} | {fmt(ratio, 2, 'x')} | {r['peak_rss_gb']:.2f} | "
            f"{r['rss_before_teacher_gb']:.2f} | {fmt(r.get('server_peak_rss_gb'), 2)} |"
        )
    return "\n".join(lines)
