"""The one place a generation engine is built: training rollouts and validation
(poweropd.train), benchmark evaluation (poweropd.evaluation) and the rollout benchmark all
call `make_engine`. Every engine answers the RolloutEngine interface of poweropd.generation.

    hf    transformers `generate` on an in-memory model (poweropd.hf_engine)
    vllm  a vLLM engine on a checkpoint folder, synced with an in-memory model when one is
          given (poweropd.vllm_engine); vLLM itself is imported only when one is built
"""

from __future__ import annotations

from poweropd.config import ROLLOUT_ENGINES, VLLMConfig
from poweropd.errors import ConfigError
from poweropd.generation import RolloutEngine
from poweropd.hf_engine import HFEngine
from poweropd.vllm_engine import VLLMEngine


def make_engine(
    kind: str,
    *,
    stop_ids: list[int],
    pad_id: int,
    model=None,
    model_path: str | None = None,
    batch_size: int = 0,
    autocast=None,
    dtype: str = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
    vllm: VLLMConfig | None = None,
    sleep: bool | None = None,
    launched: bool = False,
) -> RolloutEngine:
    """The engine `kind` ("hf" | "vllm").

    hf:   generates with `model` (an HF causal LM) `batch_size` rows at a time (0: all),
          inside `autocast()` when given (the trainer's mixed precision).
    vllm: loads `model_path` in `dtype` with the `vllm` section's memory settings and
          copies `model`'s weights in when given; `sleep` (default: the section's) frees
          its GPU memory while the trainer updates; `launched`: this process is one of
          several started by torchrun (or another launcher), and its engine joins them as
          vLLM's external launcher expects (one engine per process, on its own device)."""
    if kind == "hf":
        if model is None:
            raise ValueError("the hf engine generates with an in-memory model; pass model=")
        return HFEngine(model, stop_ids, pad_id, batch_size, autocast=autocast)
    if kind == "vllm":
        if model_path is None:
            raise ValueError("the vllm engine loads a checkpoint folder; pass model_path=")
        options = vllm or VLLMConfig()
        return VLLMEngine(
            model,
            stop_ids,
            pad_id,
            model_path=model_path,
            dtype=dtype,
            seed=seed,
            trust_remote_code=trust_remote_code,
            options=options,
            sleep=options.sleep if sleep is None else sleep,
            launched=launched,
        )
    raise ConfigError(f"unknown generation engine {kind!r}; valid: {', '.join(ROLLOUT_ENGINES)}")
