"""Build spec of the toy pair (plain dataclasses, importable without torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ToyModelSpec:
    """One toy model: Qwen3 architecture sizes plus its SFT budget."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 192
    sft_steps: int = 1250
    lr: float = 2e-3


@dataclass
class ToyPairSpec:
    """How to build the toy pair. Every field is part of the cache key."""

    seed: int = 0
    batch_size: int = 64
    warmup_steps: int = 50
    eval_problems: int = 256  # held-out val problems for the greedy accuracy check
    teacher: ToyModelSpec = field(
        default_factory=lambda: ToyModelSpec(layers=4, hidden=128, intermediate=384, sft_steps=1500, lr=2e-3)
    )
    student: ToyModelSpec = field(default_factory=ToyModelSpec)
    # These defaults mirror conf/model_pair/toy.yaml, which is what runs use.
