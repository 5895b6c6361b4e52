"""Benchmarks that print numbers (speed and memory live here, never in timed tests).

    python -m poweropd.bench logprobs                      # chunked vs naive sampled-token log-probs
    python -m poweropd.bench logprobs --tokens 1024 4096 --repeats 5 --json bench/logprobs.json

`logprobs`: log-probs of sampled tokens and their gradient (forward + backward) at the
Qwen3 vocabulary (151,936) with a small hidden size, chunked kernel vs the naive
log_softmax(hidden @ W.T).gather(...). Each case runs in a fresh process so its peak
memory is its own: CUDA max allocated on GPU, peak RSS growth on CPU. Times are medians
over the repeats after one warm-up. A naive case whose (tokens x vocabulary) tensors would
not fit in memory is skipped and says so rather than swapping the machine to death.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

QWEN3_VOCAB = 151_936


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _one_case(kind: str, tokens: int, vocab: int, hidden: int, chunk: int, repeats: int, device: str) -> dict:
    """Runs in its own process: time and peak memory of forward + backward."""
    from poweropd.logprobs import sampled_logprobs

    torch.manual_seed(0)
    dev = torch.device(device)
    h = torch.randn(tokens, hidden, device=dev, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=dev) * 0.02).requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,), device=dev)

    def step():
        if kind == "chunked":
            out = sampled_logprobs(h, w, t, chunk)
        else:
            out = torch.log_softmax(h @ w.T, dim=-1).gather(1, t[:, None]).squeeze(1)
        out.sum().backward()
        h.grad = w.grad = None

    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else _peak_rss_bytes()
    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss_bytes()) - base
    return {"kind": kind, "tokens": tokens, "time_s": statistics.median(times), "peak_mem_gb": peak / 2**30}


def _naive_bytes(tokens: int, vocab: int) -> int:
    # logits, log_softmax output and the gradient of the logits: three fp32 [N, V] tensors
    return 3 * tokens * vocab * 4


def _available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_logprobs(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    rows = []
    for tokens in args.tokens:
        for kind in ("naive", "chunked"):
            need = _naive_bytes(tokens, args.vocab)
            if kind == "naive" and need > 0.8 * _available_bytes(device):
                rows.append({"kind": kind, "tokens": tokens, "skipped": f"needs ~{need / 2**30:.0f} GB"})
                continue
            cmd = [
                sys.executable,
                "-c",
                "import json,sys; from poweropd.bench import _one_case; "
                "print(json.dumps(_one_case(*json.loads(sys.argv[1]))))",
                json.dumps([kind, tokens, args.vocab, args.hidden, args.chunk, args.repeats, device]),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"kind": kind, "tokens": tokens, "skipped": done.stderr.strip().splitlines()[-1][:200]})
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(_row_text(rows[-1]), flush=True)
    return rows


def _row_text(row: dict) -> str:
    if "skipped" in row:
        return f"{row['kind']:>8} {row['tokens']:>7}  skipped: {row['skipped']}"
    return f"{row['kind']:>8} {row['tokens']:>7}  {row['time_s']:8.3f} s  {row['peak_mem_gb']:7.2f} GB"


def _cell(row: dict, key: str, digits: int) -> str:
    return f"skipped ({row['skipped']})" if "skipped" in row else f"{row[key]:.{digits}f}"


def logprobs_table(rows: list[dict]) -> str:
    lines = [
        "| tokens | naive time (s) | chunked time (s) | time ratio | naive peak (GB) | chunked peak (GB) "
        "| memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for tokens in sorted({r["tokens"] for r in rows}):
        naive = next(r for r in rows if r["tokens"] == tokens and r["kind"] == "naive")
        chunk = next(r for r in rows if r["tokens"] == tokens and r["kind"] == "chunked")
        if "skipped" in naive or "skipped" in chunk:
            cells = [_cell(naive, "time_s", 3), _cell(chunk, "time_s", 3), "-", _cell(naive, "peak_mem_gb", 2)]
            cells += [_cell(chunk, "peak_mem_gb", 2), "-"]
            lines.append(f"| {tokens} | " + " | ".join(cells) + " |")
            continue
        lines.append(
            f"| {tokens} | {naive['time_s']:.3f} | {chunk['time_s']:.3f} | {chunk['time_s'] / naive['time_s']:.2f}x | "
            f"{naive['peak_mem_gb']:.2f} | {chunk['peak_mem_gb']:.2f} | "
            f"{naive['peak_mem_gb'] / max(chunk['peak_mem_gb'], 1e-9):.1f}x lower |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poweropd.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    lp = sub.add_parser("logprobs", help="chunked vs naive sampled-token log-probs (forward + backward)")
    lp.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    lp.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    lp.add_argument("--hidden", type=int, default=64)
    lp.add_argument("--chunk", type=int, default=1024)
    lp.add_argument("--repeats", type=int, default=3)
    lp.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    lp.add_argument("--json", default=None, help="also write the rows (and the machine) to this JSON file")
    args = parser.parse_args(argv)
    rows = bench_logprobs(args)
    table = logprobs_table(rows)
    print("\n" + table)
    if args.json:
        machine = {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu else "cpu",
            "threads": torch.get_num_threads(),
        }
        command = "python -m poweropd.bench " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.json, "w") as handle:
            json.dump({"command": command, "machine": machine, "rows": rows, "table": table}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
