"""Statistics of one update, from tensors the update already holds: no extra model
pass and no full-vocabulary tensor. Token vectors are 1-D over the valid tokens."""

from __future__ import annotations

import math
import resource
import time

import torch
from accelerate import Accelerator


def any_process(acc, flag: bool) -> bool:
    """Whether `flag` is true on any process (one all-reduce, so also a barrier)."""
    if acc.num_processes == 1:
        return bool(flag)
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), "max").item())


def gather_tokens(acc: Accelerator, x_N: torch.Tensor) -> torch.Tensor:
    """Concatenate a variable-length 1-D tensor over all processes (NaNs included)."""
    if acc.num_processes == 1:
        return x_N
    sizes = acc.gather(torch.tensor([x_N.numel()], device=x_N.device)).tolist()
    padded = acc.gather(acc.pad_across_processes(x_N, dim=0))
    width = padded.numel() // len(sizes)
    return torch.cat([padded[i * width : i * width + n] for i, n in enumerate(sizes)])


def summarize(prefix: str, x_N: torch.Tensor) -> dict:
    """mean, population std, min, max, 5th and 95th percentile of a token vector."""
    if x_N.numel() == 0:
        return {}
    x = x_N.detach().double()
    q = torch.quantile(x, torch.tensor([0.05, 0.95], dtype=x.dtype, device=x.device))
    return {
        f"{prefix}/mean": x.mean().item(),
        f"{prefix}/std": x.std(unbiased=False).item(),
        f"{prefix}/min": x.min().item(),
        f"{prefix}/max": x.max().item(),
        f"{prefix}/p5": q[0].item(),
        f"{prefix}/p95": q[1].item(),
    }


def position_stats(tokens: dict) -> dict:
    """Mean / min / max of the reward (and raw log-ratio) at each rollout position."""
    pos = tokens["pos"].long()
    size = int(pos.max().item()) + 1
    count = torch.bincount(pos, minlength=size).double()
    record = {"position": list(range(size)), "count": count.long().tolist()}
    for name in ("reward", "log_ratio", "kl"):
        if name not in tokens:
            continue
        v = tokens[name].double()
        total = torch.zeros(size, dtype=v.dtype, device=v.device).index_add_(0, pos, v)
        lo = torch.full((size,), math.inf, dtype=v.dtype, device=v.device).scatter_reduce(0, pos, v, "amin")
        hi = torch.full((size,), -math.inf, dtype=v.dtype, device=v.device).scatter_reduce(0, pos, v, "amax")
        empty = count == 0
        record[f"{name}_mean"] = (total / count.clamp(min=1)).masked_fill(empty, math.nan).tolist()
        record[f"{name}_min"] = lo.masked_fill(empty, math.nan).tolist()
        record[f"{name}_max"] = hi.masked_fill(empty, math.nan).tolist()
    return record


class StepClock:
    """Wall-clock laps (synchronising CUDA first) and peak memory of one step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.start = self.last = self._now()
        self.laps: dict[str, float] = {}

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str) -> float:
        """Close the lap `name`; returns its seconds."""
        now = self._now()
        self.laps[name] = now - self.last
        self.last = now
        return self.laps[name]

    def metrics(self) -> dict:
        out = {"step_time": self.last - self.start, **{f"time/{k}": v for k, v in self.laps.items()}}
        out["mem/peak_gb"] = peak_memory_gb(self.cuda)
        return out


def peak_memory_gb(cuda: bool) -> float:
    """CUDA: peak allocated during this step. CPU: the process's peak RSS so far."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
