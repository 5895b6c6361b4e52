"""Build spec of the toy pair (plain dataclasses, importable without torch)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from poweropd.toy.task import TASK_VERSION

BUILD_VERSION = 2  # bump when the build recipe changes in a way the spec does not capture


@dataclass
class ToyModelSpec:
    """One toy model: Qwen3 architecture sizes, its SFT budget and the style of its corpus."""

    layers: int = 2
    hidden: int = 64
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 32  # 0: hidden // heads. vLLM's CPU attention backend needs >= 32
    intermediate: int = 192
    sft_steps: int = 1200  # the most SFT steps ...
    schedule_steps: int = 2500  # ... along a cosine schedule of this length (0: sft_steps)
    stop_at_accuracy: float = 0.3  # stop at the first check with this greedy accuracy (0: never)
    check_every: int = 50  # steps between those checks
    lr: float = 2e-3
    opening_rate: float = 0.9  # share of SFT responses that open with a filler phrase (toy.task.OPENINGS)


@dataclass
class ToyPairSpec:
    """How to build the toy pair. Every field is part of the cache key."""

    seed: int = 0
    batch_size: int = 64
    warmup_steps: int = 50
    eval_problems: int = 256  # held-out val problems for the greedy accuracy check
    teacher: ToyModelSpec = field(
        default_factory=lambda: ToyModelSpec(
            layers=4,
            hidden=128,
            heads=4,
            kv_heads=2,
            head_dim=32,
            intermediate=384,
            sft_steps=1500,
            schedule_steps=1500,
            stop_at_accuracy=0.0,
            opening_rate=0.05,
        )
    )
    student: ToyModelSpec = field(default_factory=ToyModelSpec)
    # These defaults mirror conf/model_pair/toy.yaml, which is what runs use.


def cache_key(spec: ToyPairSpec) -> str:
    """The pair's identity: a hash of the build version, the task version and every spec field."""
    blob = json.dumps({"version": BUILD_VERSION, "task": TASK_VERSION, **asdict(spec)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
