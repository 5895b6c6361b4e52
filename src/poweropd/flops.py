"""The paper's FLOPs model of one OPD update (Appendix B; docs/reference.md §6).

Per prefill pass over B sequences of S tokens through L layers (hidden d, key/value width
d_kv = kv_heads * head_dim, MLP width m):

    F(B, S) = B * L * (4 S d^2 + 4 S d d_kv + 2 S^2 d + 6 S d m)

One update = teacher 1 pass + student 3 passes (forward + backward = 3x forward).
Full-vocab OPD adds the lm-heads over the T response tokens at the vocabulary V:
2 B T d_T V (teacher) + 3 * 2 B T d_S V (student, forward + backward).

With B = 32, prompt 128, T = 1024 (S = 1152), Qwen3-4B -> Qwen3-0.6B: teacher pass 254.8,
student pass 30.6, heads 25.5 + 30.6, update 346.6 (sampled-token) vs 402.7 (full-vocab)
TFLOPs. The paper adds the rounded parts: the unrounded full-vocab total is 402.64.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Arch:
    hidden: int  # d
    layers: int  # L
    intermediate: int  # m
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # V

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim


# docs/reference.md §6 (public config values of the Qwen3 checkpoints).
QWEN3 = {
    "Qwen/Qwen3-0.6B-Base": Arch(1024, 28, 3072, 16, 8, 128, 151936),
    "Qwen/Qwen3-1.7B-Base": Arch(2048, 28, 6144, 16, 8, 128, 151936),
    "Qwen/Qwen3-4B": Arch(2560, 36, 9728, 32, 8, 128, 151936),
    "Qwen/Qwen3-8B": Arch(4096, 36, 12288, 32, 8, 128, 151936),
}
QWEN3["Qwen/Qwen3-0.6B"] = QWEN3["Qwen/Qwen3-0.6B-Base"]
QWEN3["Qwen/Qwen3-1.7B"] = QWEN3["Qwen/Qwen3-1.7B-Base"]


def arch_from_hf_config(conf: dict) -> Arch:
    """From a Hugging Face config.json (text config of multimodal ones)."""
    conf = conf.get("text_config", conf)
    heads = conf["num_attention_heads"]
    return Arch(
        hidden=conf["hidden_size"],
        layers=conf["num_hidden_layers"],
        intermediate=conf["intermediate_size"],
        heads=heads,
        kv_heads=conf.get("num_key_value_heads", heads),
        head_dim=conf.get("head_dim") or conf["hidden_size"] // heads,
        vocab=conf["vocab_size"],
    )


def arch_of(model: str) -> Arch | None:
    """A model's architecture: its local config.json, else the known Qwen3 table."""
    path = Path(model).expanduser() / "config.json"
    if path.is_file():
        return arch_from_hf_config(json.loads(path.read_text()))
    return QWEN3.get(model)


def prefill_flops(arch: Arch, batch: int, seq: int) -> float:
    d, S = arch.hidden, seq
    per_layer = 4 * S * d * d + 4 * S * d * arch.d_kv + 2 * S * S * d + 6 * S * d * arch.intermediate
    return float(batch * arch.layers * per_layer)


def update_flops(teacher: Arch, student: Arch, batch: int, prompt: int, response: int) -> dict[str, float]:
    """FLOPs of one OPD update, by part (all in FLOPs; divide by 1e12 for TFLOPs)."""
    seq = prompt + response
    teacher_pass = prefill_flops(teacher, batch, seq)
    student_pass = prefill_flops(student, batch, seq)
    sampled = teacher_pass + 3 * student_pass
    head_t = 2.0 * batch * response * teacher.hidden * teacher.vocab
    head_s = 3 * 2.0 * batch * response * student.hidden * student.vocab
    return {
        "teacher_pass": teacher_pass,
        "student_pass": student_pass,
        "sampled_token": sampled,
        "teacher_head": head_t,
        "student_head": head_s,
        "full_vocab": sampled + head_t + head_s,
    }


def paper_table4_flops() -> dict[str, float]:
    """The paper's setting: Qwen3-4B -> Qwen3-0.6B-Base, B = 32, prompt 128, T = 1024 (TFLOPs)."""
    parts = update_flops(QWEN3["Qwen/Qwen3-4B"], QWEN3["Qwen/Qwen3-0.6B-Base"], 32, 128, 1024)
    return {k: v / 1e12 for k, v in parts.items()}


def describe(arch: Arch) -> dict:
    return asdict(arch)
