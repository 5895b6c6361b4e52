"""Benchmark 8: the device check - one command that says whether a machine runs the paper's
path, and how fast, in minutes.

    python -m poweropd.bench device --json docs/bench/device.json        # a GPU: under 8 minutes
    python -m poweropd.bench device --cpu                                # a CPU: reduced shapes, under 3

Four parts, each in its own process (a part that fails, a missing vLLM say, becomes a row
saying why, and the others still run):

- kernels: the chunked lm-head kernels (sampled-token log-probs, the fused PowerOPD loss, the
  full-vocab KL) in the run's precision (bf16 on a GPU) against a naive fp32 log-softmax on
  the same inputs: the largest log-prob error and the relative error of the gradients.
- update: one OPD update (PowerOPD alpha 5, random weights) at Qwen3-4B -> Qwen3-0.6B-Base
  shapes with the paper's batch and lengths (32 rollouts of 128 + 1024 tokens) on a GPU:
  seconds per update and CUDA max-allocated memory, beside the paper's Table 4 (9.03 s,
  60.72 GiB for PowerOPD on this pair; its hardware and rollout engine differ from yours, so
  read it as a scale, not a target). On a CPU the `tiny` shapes.
- rollout: HF generate vs the vLLM engine, tokens per second on the same prompts.
- teacher: scoring by the teacher in the trainer vs by a vLLM server
  (`python -m poweropd.serve teacher`): loss tokens per second.
"""

from __future__ import annotations

import time

import torch

from poweropd.bench.common import fmt, positive_int, run_isolated

PARTS = ("kernels", "update", "rollout", "teacher")
PAPER_TABLE4 = {"step_s": 9.03, "peak_mem_gb": 60.72}  # PowerOPD, Qwen3-4B -> Qwen3-0.6B-Base


def sizes(device: str) -> dict:
    """What each part runs at: the paper's shapes on a GPU, shapes that fit minutes on a CPU."""
    if device == "cuda":
        return {
            "kernel_tokens": 4096,
            "kernel_hidden": 1024,
            "update_shapes": "qwen3-4b-0.6b",
            "batch": 32,
            "prompt": 128,
            "response": 1024,
            "micro": 8,
            "rollout_model": "qwen3-0.6b",
            "rollout_prompts": 32,
            "rollout_tokens": 256,
            "teacher_shapes": "qwen3-4b-0.6b",
        }
    return {
        "kernel_tokens": 256,
        "kernel_hidden": 64,
        "update_shapes": "tiny",
        "batch": 4,
        "prompt": 32,
        "response": 32,
        "micro": 0,
        "rollout_model": "toy",
        "rollout_prompts": 8,
        "rollout_tokens": 32,
        "teacher_shapes": "tiny",
    }


def kernel_exactness(tokens: int, vocab: int, hidden: int, chunk: int, device: str) -> dict:
    """The kernels in the device's training precision against naive fp32 autograd."""
    from poweropd.logprobs import full_vocab_kl, sampled_logprobs, sampled_pg_loss

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    h32 = torch.randn(tokens, hidden, generator=gen).to(device)
    w32 = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device)
    wt32 = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device)
    ht32 = torch.randn(tokens, hidden, generator=gen).to(device)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    weights = torch.full((tokens,), 1.0 / tokens, device=device)
    lT = torch.log_softmax(ht32 @ wt32.T, -1).gather(1, targets[:, None]).squeeze(1)

    # PowerOPD at alpha 0.5: random weights give every token a probability near 1/V, and at a
    # large alpha the rewards (and gradients) would underflow, leaving nothing to compare
    def power(lS_C, rows):
        return torch.exp(0.5 * lT[rows]) - torch.exp(0.5 * lS_C)

    # the same (rounded) inputs in fp32: the errors below are the kernels', not the rounding's
    h, w = h32.to(dtype), w32.to(dtype)

    def leaf(t, as_dtype=None):  # a fresh leaf (the .to() of a tensor already in a dtype is that tensor)
        return t.detach().to(as_dtype or t.dtype).clone().requires_grad_()

    ref_h, ref_w = leaf(h, torch.float32), leaf(w, torch.float32)
    ref_lS = torch.log_softmax(ref_h @ ref_w.T, -1).gather(1, targets[:, None]).squeeze(1)
    (-(weights * power(ref_lS.detach(), slice(None)) * ref_lS).sum()).backward()

    def rel(a, b):  # in float64, so that small gradients do not underflow the norms
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm()).item()

    out = {"dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "vocab": vocab, "hidden": hidden}
    kh, kw = leaf(h), leaf(w)
    lS = sampled_logprobs(kh, kw, targets, chunk)
    out["logprob_max_abs_err"] = (lS.float() - ref_lS.detach()).abs().max().item()
    fh, fw = leaf(h), leaf(w)
    loss = sampled_pg_loss(fh, fw, targets, weights, power, chunk)[0]
    loss.backward()
    out["power_loss_grad_rel_err"] = max(rel(fh.grad, ref_h.grad), rel(fw.grad, ref_w.grad))
    # full-vocab KL(student || teacher), against the naive one
    sh, sw = leaf(h), leaf(w)
    kl = full_vocab_kl(sh, sw, ht32.to(dtype), wt32.to(dtype), targets, weights, chunk)[0]
    kl.backward()
    nh, nw = leaf(h, torch.float32), leaf(w, torch.float32)
    teacher_logits = ht32.to(dtype).float() @ wt32.to(dtype).float().T
    logp, logq = torch.log_softmax(nh @ nw.T, -1), torch.log_softmax(teacher_logits, -1)
    naive = (weights[:, None] * logp.exp() * (logp - logq)).sum()
    naive.backward()
    out["full_vocab_kl_rel_err"] = abs(kl.item() - naive.item()) / max(abs(naive.item()), 1e-30)
    out["full_vocab_grad_rel_err"] = max(rel(sh.grad, nh.grad), rel(sw.grad, nw.grad))
    return out


def _part_kernels(args, device: str, s: dict) -> list[dict]:
    from poweropd.bench.common import QWEN3_VOCAB

    kwargs = dict(tokens=s["kernel_tokens"], vocab=QWEN3_VOCAB, hidden=s["kernel_hidden"], chunk=1024, device=device)
    return [{"part": "kernels", **run_isolated("poweropd.bench.device:kernel_exactness", kwargs)}]


def _part_update(args, device: str, s: dict) -> list[dict]:
    kwargs = dict(
        reward="power",
        shapes=s["update_shapes"],
        batch=s["batch"],
        prompt=s["prompt"],
        response=s["response"],
        chunk=1024,
        micro=s["micro"],
        repeats=1,
        device=device,
        generate_rollouts=False,
    )
    row = run_isolated("poweropd.bench.step:case", kwargs)
    return [{"part": "update", "shapes": s["update_shapes"], **row}]


def _part_rollout(args, device: str, s: dict) -> list[dict]:
    rows = []
    for engine in ("hf", "vllm"):
        kwargs = dict(
            model=s["rollout_model"],
            engine=engine,
            prompts=s["rollout_prompts"],
            prompt_len=64,
            max_new_tokens=s["rollout_tokens"],
            repeats=2,
            eval_n=1,
            threads=args.threads,
            cache_dir=None,
            device=device,
        )
        row = run_isolated("poweropd.bench.rollout:measure", kwargs)
        row.pop("greedy_rows", None)
        rows.append({"part": "rollout", **row, "engine": engine})
    return rows


def _part_teacher(args, device: str, s: dict) -> list[dict]:
    from poweropd.bench.teacher import measure_backend, save_teacher

    folder = save_teacher(s["teacher_shapes"], device)
    rows = []
    for backend in ("hf", "server"):
        kwargs = dict(
            backend=backend,
            shapes=s["teacher_shapes"],
            folder=folder,
            url=f"http://127.0.0.1:{args.port}",
            rollouts=8 if device == "cpu" else 16,
            prompt_len=32 if device == "cpu" else 128,
            completion_len=32 if device == "cpu" else 1024,
            k=0,
            repeats=2,
            threads=args.threads,
            device=device,
        )
        try:
            row = measure_backend(kwargs, args.port)
        except Exception as exc:  # noqa: BLE001 - a server that did not start is a row saying so
            row = {"skipped": f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        rows.append({"part": "teacher", **row, "backend": backend})
    return rows


RUNNERS = {"kernels": _part_kernels, "update": _part_update, "rollout": _part_rollout, "teacher": _part_teacher}


def run(args, device: str) -> list[dict]:
    s = sizes(device)
    rows = []
    for part in args.parts:
        started = time.perf_counter()
        got = RUNNERS[part](args, device, s)
        for row in got:
            row["part_s"] = time.perf_counter() - started
        print(f"{part}: {got}"[:400], flush=True)
        rows += got
    return rows


def _line(row: dict) -> str:
    part = row["part"]
    if "skipped" in row:
        what = row.get("engine") or row.get("backend") or ""
        return f"| {part} | {what} | not run: {row['skipped'][:120]} | |"
    if part == "kernels":
        return (
            f"| kernels | {row['dtype']}, {row['tokens']} tokens x {row['vocab']:,} | log-prob max error "
            f"{row['logprob_max_abs_err']:.1e}; PowerOPD grad rel. error {row['power_loss_grad_rel_err']:.1e}; "
            f"full-vocab KL rel. error {row['full_vocab_kl_rel_err']:.1e}, grad {row['full_vocab_grad_rel_err']:.1e}"
            " | naive fp32 autograd on the same inputs |"
        )
    if part == "update":
        paper = PAPER_TABLE4
        return (
            f"| update | {row['shapes']}, {row['batch']} x {row['response']} tokens | {fmt(row['step_s'])} s, "
            f"peak {fmt(row['peak_mem_gb'])} GiB | paper Table 4: {paper['step_s']} s, {paper['peak_mem_gb']} GiB |"
        )
    if part == "rollout":
        return f"| rollout | {row['engine']}, {row['model']} | {fmt(row['tokens_per_s'])} tokens/s | hf vs vllm |"
    return f"| teacher | {row['backend']} | {fmt(row.get('tokens_per_s'))} loss tokens/s | in the trainer vs served |"


def table(rows: list[dict]) -> str:
    lines = ["| part | case | measured | compared with |", "|---|---|---|---|"]
    lines += [_line(r) for r in rows]
    seconds = {r["part"]: r["part_s"] for r in rows}  # each part's rows share its time
    lines.append("")
    lines.append("seconds per part: " + ", ".join(f"{part} {fmt(s, 1)}" for part, s in seconds.items()))
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which checks (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per measuring process")
    p.add_argument("--port", type=positive_int, default=8331, help="the teacher server's port (127.0.0.1)")


def describe(args, device: str) -> str:
    s = sizes(device)
    return (
        f"device check on {device}: {', '.join(args.parts)}; update at `{s['update_shapes']}` shapes, "
        f"{s['batch']} rollouts of {s['prompt']} + {s['response']} tokens"
    )
