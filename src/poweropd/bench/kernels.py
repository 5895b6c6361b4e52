"""Benchmark 1: the lm-head kernels at the Qwen3 vocabulary.

Log-probs of sampled tokens and their gradient (forward + backward) with a small hidden
size, three ways:

    naive     log_softmax(hidden @ W.T).gather(...), autograd
    chunked   sampled_logprobs: chunks of tokens, backward recomputes the logits
    fused     sampled_pg_loss: the OPD loss with its gradient formed in the forward

Each case runs in a fresh process so its peak memory is its own. A naive case whose
(tokens x vocabulary) tensors cannot fit is skipped and says so instead of swapping.
"""

from __future__ import annotations

import torch

from poweropd.bench.common import PeakMemory, available_bytes, median_time, positive_int, run_isolated

KINDS = ("naive", "chunked", "fused")


def case(kind: str, tokens: int, vocab: int, hidden: int, chunk: int, repeats: int, device: str) -> dict:
    from poweropd.logprobs import sampled_logprobs, sampled_pg_loss

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * 0.02).requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,), device=device)
    lT = torch.randn(tokens, device=device).clamp(max=0)
    weights = torch.full((tokens,), 1.0 / tokens, device=device)

    def power(lS_C, rows):
        return torch.exp(lT[rows]) - torch.exp(lS_C)

    def step():
        if kind == "fused":
            loss = sampled_pg_loss(h, w, t, weights, power, chunk)[0]
        else:
            if kind == "chunked":
                lS = sampled_logprobs(h, w, t, chunk)
            else:
                lS = torch.log_softmax(h @ w.T, dim=-1).gather(1, t[:, None]).squeeze(1)
            loss = -(weights * power(lS.detach(), slice(None)) * lS).sum()
        loss.backward()
        h.grad = w.grad = None

    memory = PeakMemory(device)
    memory.start()
    step()  # warm-up
    seconds, _ = median_time(step, repeats, device)
    return {"kind": kind, "tokens": tokens, "time_s": seconds, **memory.result()}


def naive_bytes(tokens: int, vocab: int) -> int:
    # logits, log_softmax output and the gradient of the logits: three fp32 [N, V] tensors
    return 3 * tokens * vocab * 4


def run(args, device: str) -> list[dict]:
    rows = []
    for tokens in args.tokens:
        for kind in args.kinds:
            need = naive_bytes(tokens, args.vocab)
            if kind == "naive" and need > 0.8 * available_bytes(device):
                rows.append({"kind": kind, "tokens": tokens, "skipped": f"needs ~{need / 2**30:.0f} GB"})
            else:
                kwargs = dict(
                    kind=kind,
                    tokens=tokens,
                    vocab=args.vocab,
                    hidden=args.hidden,
                    chunk=args.chunk,
                    repeats=args.repeats,
                    device=device,
                )
                rows.append({"kind": kind, "tokens": tokens, **run_isolated("poweropd.bench.kernels:case", kwargs)})
            print(row_text(rows[-1]), flush=True)
    return rows


def row_text(row: dict) -> str:
    if "skipped" in row:
        return f"{row['kind']:>8} {row['tokens']:>7}  skipped: {row['skipped']}"
    return f"{row['kind']:>8} {row['tokens']:>7}  {row['time_s']:8.3f} s  {row['growth_mem_gb']:7.2f} GB"


def _cell(row: dict | None, key: str, digits: int) -> str:
    if row is None:
        return "-"
    return f"skipped ({row['skipped']})" if "skipped" in row else f"{row[key]:.{digits}f}"


def _ratio(num: dict | None, den: dict | None, key: str, suffix: str) -> str:
    if not num or not den or "skipped" in num or "skipped" in den:
        return "-"
    return f"{num[key] / max(den[key], 1e-9):.2f}x{suffix}"


def table(rows: list[dict]) -> str:
    """One line per token count: time and memory of each kind, and chunked/fused vs naive.
    Memory is the growth of peak memory over the process's state before the case."""
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    head = ["tokens"] + [f"{k} time (s)" for k in kinds] + [f"{k} peak (GB)" for k in kinds]
    others = [k for k in kinds if k != "naive"]
    if "naive" in kinds:
        head += [f"{k} time / naive" for k in others] + [f"naive peak / {k}" for k in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tokens in sorted({r["tokens"] for r in rows}):
        by = {r["kind"]: r for r in rows if r["tokens"] == tokens}
        cells = [str(tokens)]
        cells += [_cell(by.get(k), "time_s", 3) for k in kinds]
        cells += [_cell(by.get(k), "growth_mem_gb", 2) for k in kinds]
        if "naive" in kinds:
            cells += [_ratio(by.get(k), by.get("naive"), "time_s", "") for k in others]
            cells += [_ratio(by.get("naive"), by.get(k), "growth_mem_gb", " lower") for k in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--vocab", type=positive_int, default=151_936)
    parser.add_argument("--hidden", type=positive_int, default=64)
    parser.add_argument("--chunk", type=positive_int, default=1024)
    parser.add_argument("--repeats", type=positive_int, default=3)


def describe(args, device: str) -> str:
    return (
        f"vocabulary {args.vocab:,}, hidden {args.hidden}, chunks of {args.chunk} tokens, forward + backward, "
        f"median of {args.repeats} after a warm-up, one process per case; peak = growth of "
        + ("CUDA max allocated" if device == "cuda" else "the process's peak RSS")
    )
