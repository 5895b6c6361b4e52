"""Prompt sources for training and in-training validation.

Rows look like the benchmark files: {"id", "problem", "answer", ...}. `toy` rows are
generated (poweropd.toy.task); `deepscaler` rows come from `<data_dir>/deepscaler_train.jsonl`
when a data directory is given (or POWEROPD_DATA is set), else from the hub dataset
agentica-org/DeepScaleR-Preview-Dataset through `datasets`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from poweropd.config import ConfigError

TOY_TRAIN_POOL = 20_000  # distinct toy training prompts; the sampler cycles through them
DEEPSCALER_HUB = ("agentica-org/DeepScaleR-Preview-Dataset", "train")


def read_jsonl(path: str | os.PathLike, required=("id", "problem", "answer")) -> list[dict]:
    """Read a benchmark-style JSON Lines file; any bad line is a one-line error with file:line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist; set training.data_dir (or POWEROPD_DATA) to its folder")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if not row.get(k) and row.get(k) != 0]
            if missing:
                raise ConfigError(f"{path}:{lineno}: missing or empty field(s) {', '.join(missing)}")
            rows.append(row)
    if not rows:
        raise ConfigError(f"data file {path} is empty")
    return rows


def train_rows(source: str, data_dir: str | None, seed: int) -> list[dict]:
    if source == "toy":
        from poweropd.toy.task import make_problems

        return make_problems("train", TOY_TRAIN_POOL, seed=seed)
    if source == "deepscaler":
        data_dir = data_dir or os.environ.get("POWEROPD_DATA")
        if data_dir:
            return read_jsonl(Path(data_dir).expanduser() / "deepscaler_train.jsonl")
        from datasets import load_dataset

        name, split = DEEPSCALER_HUB
        try:
            rows = load_dataset(name, split=split)
        except Exception as exc:  # offline node, missing credentials, hub outage: one line
            raise ConfigError(
                f"could not load {name} from the hub ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
                "set training.data_dir (or POWEROPD_DATA) to a folder holding deepscaler_train.jsonl"
            ) from None
        return [{"id": f"deepscaler-{i}", "problem": r["problem"], "answer": r["answer"]} for i, r in enumerate(rows)]
    raise ConfigError(f"unknown training.train_data {source!r}")


def val_rows(source: str, n: int, seed: int) -> list[dict]:
    if source == "none" or n == 0:
        return []
    if source == "toy":
        from poweropd.toy.task import make_problems

        return make_problems("val", n, seed=seed)
    raise ConfigError(f"unknown training.val_data {source!r}")


class PromptSampler:
    """Deterministic, resumable stream of prompt batches.

    Epoch e visits the rows in the order randperm(len, generator seeded with seed + e);
    the position (epoch, offset) goes into every checkpoint, so a resumed run sees the
    same prompts as an uninterrupted one. Every process draws the same global batch and
    keeps its own slice of it.
    """

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed = rows, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.rows), generator=gen).tolist()

    def next_batch(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.offset == len(self.rows):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(n - len(out), len(self.rows) - self.offset)
            out += [self.rows[i] for i in self._order[self.offset : self.offset + take]]
            self.offset += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)
