"""The run-directory contract, and the writers that fill it.

    <run_dir>/
      .hydra/                     Hydra's composed config, hydra config, overrides
      run_config.json             the full validated config the run started with
      metrics.jsonl               one JSON object per step ("step": 0 is before training)
      positions.jsonl             position-wise reward mean/min/max every K steps
      reward_dump.npz             every token-level reward of pre-training rollouts (Fig 2a)
      reward_dump_rollouts.jsonl  the text of those rollouts
      samples.jsonl               a few validation responses at each validation
      checkpoints/step_XXXXXX/    save_pretrained student + tokenizer + state/ (resume)
      checkpoints/latest          name of the newest complete checkpoint
      student/                    final save_pretrained student + tokenizer
      summary.json                written last: its presence means the run finished

The local files are the source of truth; W&B (logger=wandb) only mirrors metrics.jsonl.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import secrets
import socket
import time
from pathlib import Path

from poweropd.errors import ConfigError
from poweropd.files import (
    DiskFull,
    is_disk_full,
    read_jsonl_lenient,
    try_lock,
    unreadable_lines,
    write_json_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
POSITIONS = "positions.jsonl"
SAMPLES = "samples.jsonl"
REWARD_DUMP = "reward_dump.npz"
REWARD_DUMP_ROLLOUTS = "reward_dump_rollouts.jsonl"
SUMMARY = "summary.json"
RUN_CONFIG = "run_config.json"
CHECKPOINTS = "checkpoints"
FINAL_MODEL = "student"
LOCK = ".lock"  # held (flock) by the process that runs in the directory, for its lifetime
# What a launch writes into a run directory before any of the run's own files: Hydra's files
# and the run lock. A directory holding only these has no run in it.
HYDRA_OWN = frozenset({".hydra", "run.log", LOCK})


class RunLock:
    """An OS-level exclusive lock on a run directory (flock on <run_dir>/.lock): released by
    the kernel when the process ends, however it ends, so a killed run never leaves a stale
    lock. A second process on the same directory is refused in one line naming the holder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.handle = None

    def acquire(self) -> RunLock:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run's lifetime
            except OSError as exc:
                raise ConfigError(f"cannot create the run lock {self.path} ({exc.strerror or exc})") from None
            try:
                locked = try_lock(handle)
            except OSError as exc:  # e.g. a filesystem without locks (some NFS mounts)
                handle.close()
                raise ConfigError(
                    f"cannot lock {self.path} ({exc.strerror or exc}); put the run directory on a local filesystem"
                ) from None
            if not locked:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise ConfigError(
                    f"{self.path.parent} is in use by {holder}; wait for that run to end (or stop it), "
                    "or choose another hydra.run.dir"
                )
            # The lock file may have been removed (a refused launch cleaning up) between our
            # open and our lock: then we hold a lock nobody else can see; take a fresh one.
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def flatten(tree: dict, prefix: str = "") -> dict:
    """A recorded config as flat dotted keys ({"reward": {"alpha": 5}} -> {"reward.alpha": 5});
    lists become their JSON text, so that every value compares and fits a table cell."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _clean(value):
    """NaN / inf are not JSON; write them as null so every line parses everywhere."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class JsonlWriter:
    """Append-only JSONL file, flushed per line so a killed run loses at most one line."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None

    def write(self, record: dict) -> None:
        try:
            if self._handle is None:
                self._handle = self.path.open("a", encoding="utf-8")
            self._handle.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self._handle = None  # the partial line is set aside by the resume
            raise DiskFull(
                f"writing {self.path} failed: no space left on device; the run's last checkpoint is intact: "
                "free space and run the same command to resume"
            ) from None

    def truncate_after(self, step: int) -> tuple[int, list[int]]:
        """Drop every line whose step is > `step` (work a resumed run will redo) and every
        unreadable line (a partial line of a killed write, a cut or corrupted file). Both are
        kept in <name>.discarded for the record, unreadable ones as their raw text.
        Returns (lines dropped, line numbers that were unreadable)."""
        self.close()
        rows, bad = read_jsonl_lenient(self.path)
        keep = [r for r in rows if r.get("step", -1) <= step]
        dropped = [r for r in rows if r.get("step", -1) > step]
        if dropped or bad:
            with self.path.with_suffix(".discarded").open("a", encoding="utf-8") as handle:
                for row in dropped:
                    handle.write(json.dumps(row) + "\n")
                for text in unreadable_lines(self.path, bad):
                    handle.write(text + "\n")
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        return len(dropped), bad

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class Tracker:
    """Writes the run directory (main process only) and mirrors metrics to W&B."""

    def __init__(self, run_dir: Path, logger_cfg, config_dict: dict, enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled
        self.metrics = JsonlWriter(run_dir / METRICS)
        self.positions = JsonlWriter(run_dir / POSITIONS)
        self.samples = JsonlWriter(run_dir / SAMPLES)
        self.wandb = None
        if enabled and logger_cfg.name == "wandb":
            self.wandb = _start_wandb(run_dir, logger_cfg, config_dict)

    def rewind(self, step: int) -> list[int]:
        """Prepare the files for a run resumed after `step`; returns the metrics.jsonl line
        numbers that were unreadable (kept in metrics.discarded, counted in the summary)."""
        if not self.enabled:
            return []
        unreadable = []
        for writer in (self.metrics, self.positions, self.samples):
            dropped, bad = writer.truncate_after(step)
            if dropped:
                log.info("resume: set aside %d line(s) of %s written after step %d", dropped, writer.path.name, step)
            if bad:
                log.warning(
                    "resume: %d unreadable line(s) of %s (lines %s) kept in %s",
                    len(bad),
                    writer.path.name,
                    ", ".join(map(str, bad[:5])),
                    writer.path.with_suffix(".discarded").name,
                )
            if writer is self.metrics:
                unreadable = bad
        return unreadable

    def start_fresh(self) -> None:
        """A run starting at step 0 in a directory that has old files keeps them aside."""
        if not self.enabled:
            return
        for writer in (self.metrics, self.positions, self.samples):
            if writer.path.exists() and writer.path.stat().st_size:
                aside = writer.path.with_suffix(".stale")
                os.replace(writer.path, aside)
                log.warning("%s already existed without a checkpoint; moved it to %s", writer.path.name, aside.name)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write({"step": step, **metrics})
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if _clean(v) is not None}, step=step)

    def log_positions(self, step: int, record: dict) -> None:
        if self.enabled:
            self.positions.write({"step": step, **record})

    def log_samples(self, step: int, samples: list[dict]) -> None:
        if self.enabled:
            for sample in samples:
                self.samples.write({"step": step, **sample})

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        for writer in (self.metrics, self.positions, self.samples):
            writer.close()
        if self.wandb is not None:
            for key, value in summary.items():
                if isinstance(value, (int, float)):
                    self.wandb.summary[key] = value
            self.wandb.finish()
        write_json_atomic(self.run_dir / SUMMARY, summary)

    def close(self) -> None:
        for writer in (self.metrics, self.positions, self.samples):
            writer.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1)


def _start_wandb(run_dir: Path, cfg, config_dict: dict):
    import wandb

    mode = cfg.mode
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
        mode = "online" if has_key else "offline"
        if mode == "offline":
            log.info("wandb: no API key configured, logging offline (sync later with `wandb sync %s/wandb`)", run_dir)
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        tags=list(cfg.tags),
        config=config_dict,
    )


def _netrc_has_wandb() -> bool:
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
