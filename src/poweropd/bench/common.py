"""What every benchmark shares: the machine, clocks, peak memory, one process per case,
and the JSON + Markdown files a benchmark leaves behind."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

QWEN3_VOCAB = 151_936


def _whole(text: str, smallest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < smallest:
        raise argparse.ArgumentTypeError(f"must be >= {smallest} (got {value})")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0 (token counts, sizes, repeats)."""
    return _whole(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (0 meaning "all" or "default")."""
    return _whole(text, 0)


def pick_device(cpu: bool) -> str:
    return "cuda" if torch.cuda.is_available() and not cpu else "cpu"


def machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device: str) -> tuple[float, list[float]]:
    """Median wall time of `fn()` over `repeats` calls (CUDA synchronised around each)."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class PeakMemory:
    """Peak memory over a stretch of work.

    CUDA: max allocated since `start()` (absolute: models, optimizer state and all).
    CPU: the process's peak RSS (a high-water mark since the process began, which is why
    every case runs in its own process) and its growth over the RSS at `start()`.
    """

    def __init__(self, device: str):
        self.device = device
        self.base = 0

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_now_bytes()

    def result(self) -> dict:
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else peak_rss_bytes()
        return {
            "peak_mem_gb": peak / 2**30,
            "base_mem_gb": self.base / 2**30,
            "growth_mem_gb": (peak - self.base) / 2**30,
        }


def available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_isolated(target: str, kwargs: dict) -> dict:
    """Run `module:function(**kwargs)` in a fresh Python process; its JSON result, or
    {"skipped": <last error line>} if it failed (out of memory, say)."""
    module, function = target.split(":")
    code = (
        "import json, sys; from importlib import import_module; "
        f"out = getattr(import_module({module!r}), {function!r})(**json.loads(sys.argv[1])); "
        "print('@@RESULT@@' + json.dumps(out))"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@") :])
    lines = (done.stderr or done.stdout or f"exit status {done.returncode}").strip().splitlines()
    return {"skipped": (lines[-1] if lines else f"exit status {done.returncode}")[:300]}


def command_line(name: str, argv: list[str] | None) -> str:
    args = argv if argv is not None else sys.argv[2:]
    return " ".join(["python -m poweropd.bench", name, *args])


def write_outputs(path: str | None, payload: dict, table: str) -> None:
    """`path` gets the JSON (command, machine, rows, table); the same name with .md gets
    the command, the machine and the table."""
    if not path:
        return
    json_path = Path(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**payload, "table": table}, indent=2) + "\n")
    m = payload["machine"]
    lines = [
        f"`{payload['command']}`",
        "",
        f"Machine: {m['device']}, {m['cpu_threads']} torch threads, torch {m['torch']}, {m['platform']}.",
        "",
        f"Setup: {payload['setup']}.",
        "",
        table,
        "",
    ]
    json_path.with_suffix(".md").write_text("\n".join(lines))


def fmt(value, digits: int = 3, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{unit}"
