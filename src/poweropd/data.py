"""Prompt sources for training and in-training validation.

Rows come from the benchmark registry (poweropd.benchmarks): the toy splits are
generated; `deepscaler` and the math benchmarks are read from `<data_dir>/<name>.jsonl`
when a data directory is given (or POWEROPD_DATA is set), else from their hub datasets.
"""

from __future__ import annotations

import torch

from poweropd.benchmarks import load_benchmark
from poweropd.errors import ConfigError

TOY_TRAIN_POOL = 20_000  # distinct toy training prompts; the sampler cycles through them
# A prompt this many UTF-8 bytes per allowed token is refused without tokenising it (no
# tokenizer packs more into one token in practice; a 10 MB line never reaches the tokenizer).
BYTES_PER_TOKEN_BOUND = 64


def train_rows(source: str, data_dir: str | None) -> list[dict]:
    """Training prompts: `toy` (generated) or `deepscaler` (local file or hub)."""
    if source == "toy":
        return load_benchmark("toy_train", toy_size=TOY_TRAIN_POOL)
    if source == "deepscaler":
        return load_benchmark("deepscaler_train", data_dir)
    raise ConfigError(f"unknown training.train_data {source!r}; valid: toy, deepscaler")


def val_rows(source: str, n: int, data_dir: str | None, seed: int = 0) -> list[dict]:
    """Held-out prompts for in-training validation and the reward dump.

    `toy`: the first n problems of the toy val split. A benchmark name (e.g. `math500`):
    n problems drawn at random (seeded) from it, the paper's "100 random MATH-500 problems".
    """
    if source == "none" or n == 0:
        return []
    if source == "toy":
        return load_benchmark("toy_val", toy_size=n)
    rows = load_benchmark(source, data_dir)
    if n >= len(rows):
        return rows
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()[:n]
    return [rows[i] for i in sorted(pick)]


def bound_prompts(rows: list[dict], tokenizer, max_tokens: int) -> tuple[list[dict], list[str]]:
    """The rows whose problem text is at most `max_tokens` tokens, and the ids of the others.

    Byte-level tokenizers emit at most one token per UTF-8 byte, so a problem of at most
    `max_tokens` bytes is kept without tokenising it; one of more than BYTES_PER_TOKEN_BOUND
    bytes per allowed token is dropped without tokenising it; only the ones between are
    counted exactly."""
    kept, skipped = [], []
    for row in rows:
        size = len(row["problem"].encode("utf-8"))
        too_long = size > max_tokens and (
            size > BYTES_PER_TOKEN_BOUND * max_tokens
            or len(tokenizer(row["problem"], add_special_tokens=False)["input_ids"]) > max_tokens
        )
        (skipped if too_long else kept).append(row["id"] if too_long else row)
    if not kept:
        raise ConfigError(
            f"every one of the {len(rows)} training prompts is longer than training.max_prompt_tokens={max_tokens}; "
            "raise it, or check the training data"
        )
    return kept, skipped


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
