"""Typed config schema. Hydra composes YAML into these dataclasses; library code only
ever sees the validated dataclass instances, never a raw DictConfig.

Three layers of checking, all before any model is loaded:
1. `check_overrides` (run.py, before Hydra starts): unknown keys, unknown group options
   and wrong value types on the command line, each as one line with the valid choices;
2. the ConfigStore schema: Hydra refuses keys that a YAML file adds by mistake;
3. `__post_init__` range checks when the composed config becomes dataclasses
   (`to_config`): alpha <= 0, clip low >= high, tau <= 0, and so on.
Every failure is a `ConfigError` whose message is one line naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from poweropd.errors import ConfigError
from poweropd.toy.spec import ToyPairSpec

KL_ESTIMATORS = ("k1", "k2", "k3")
NORMALIZE_MODES = ("none", "zscore")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean")
STOP_TOKEN_MODES = ("mask", "raw")
PAIR_KINDS = ("toy", "hf")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
TRAIN_DATA = ("toy", "deepscaler")
# In-training validation sources: the toy val split or one of the math benchmarks (registry names).
VAL_DATA = ("toy", "none", "math500", "gsm8k", "amc23", "aime24", "aime25", "minerva", "olympiadbench")
LOGGERS = ("local", "wandb")
WANDB_MODES = ("auto", "online", "offline", "disabled")


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _one_of(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def _positive(key: str, value: float, strict: bool = True) -> None:
    if value < 0 or (strict and value == 0):
        bound = "> 0" if strict else ">= 0"
        raise ConfigError(f"{key} must be {bound} (got {value})")


@dataclass
class RewardConfig:
    """The OPD objective. Transform, normalisation, aggregation and stop-token handling
    are independent knobs; the defaults follow docs/reference.md §1."""

    name: str = _help("objective: a name in poweropd.objectives' registry (conf/reward/ has one file each)", "vanilla")
    alpha: float = _help("power: r = pi_T^alpha - pi_theta^alpha, alpha > 0", 5.0)
    clip_low: float = _help("clip: lower bound c_l of clamp(lT - lS, c_l, c_h)", -1.0)
    clip_high: float = _help("clip: upper bound c_h", 1.0)
    tau: float = _help("tanh: r = tanh((lT - lS) / tau), tau > 0 (the paper gives none)", 1.0)
    beta: float = _help("jsd: 0 = KL(P_T||P_S), 1 = KL(P_S||P_T), between: JSD with M = beta P_T + (1-beta) P_S", 0.5)
    k: int = _help("topk_kl: teacher tokens per position in the forward KL", 64)
    estimator: str = _help("kl_loss: k1 | k2 | k3, back-propagated directly as the loss", "k3")
    gamma: float = _help("reward-to-go discount over the rollout (0 = per-token rewards, the paper)", 0.0)
    task_weight: float = _help("weight of the grader's correctness of the rollout (0 = pure distillation)", 0.0)
    normalize: str = _help("batch normalisation after the transform: none | zscore", "none")
    loss_agg: str = _help("token_mean (global over the batch) | seq_mean (mean of per-rollout means)", "token_mean")
    stop_token: str = _help("mask: drop a terminal stop token from reward/loss/N | raw: keep it", "mask")

    def __post_init__(self) -> None:
        _one_of("reward.normalize", self.normalize, NORMALIZE_MODES)
        _one_of("reward.loss_agg", self.loss_agg, LOSS_AGGREGATIONS)
        _one_of("reward.stop_token", self.stop_token, STOP_TOKEN_MODES)
        if not self.alpha > 0:
            raise ConfigError(
                f"reward.alpha must be > 0 (got {self.alpha}); PowerOPD's pi_T^alpha - pi_theta^alpha "
                "is bounded and sign-consistent only for alpha > 0 (alpha -> 0 is reward=vanilla)"
            )
        if not self.clip_low < self.clip_high:
            raise ConfigError(f"reward.clip_low ({self.clip_low}) must be < reward.clip_high ({self.clip_high})")
        if not self.tau > 0:
            raise ConfigError(f"reward.tau must be > 0 (got {self.tau})")
        if not 0 <= self.beta <= 1:
            raise ConfigError(f"reward.beta must be in [0, 1] (got {self.beta}); 0 = forward KL, 1 = reverse KL")
        if self.k < 1:
            raise ConfigError(f"reward.k must be >= 1 (got {self.k})")
        _one_of("reward.estimator", self.estimator, KL_ESTIMATORS)
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"reward.gamma must be in [0, 1] (got {self.gamma}); 0 = per-token rewards")
        if self.task_weight < 0:
            raise ConfigError(f"reward.task_weight must be >= 0 (got {self.task_weight})")
        # The objective's own refusals (a knob it cannot act on, vanilla never normalised, ...)
        # live with its registry entry; this also refuses an unknown name with the valid ones.
        from poweropd.objectives import check_composition

        check_composition(self)

    @property
    def label(self) -> str:
        """The method's name in tables and legends (poweropd.objectives.method_label)."""
        from poweropd.objectives import method_label

        return method_label(dataclasses.asdict(self))


ROLLOUT_ENGINES = ("hf", "vllm")


@dataclass
class VLLMConfig:
    """The vLLM engine (training.rollout_engine=vllm, eval.backend=vllm); see poweropd.vllm_engine."""

    gpu_memory_utilization: float = _help("GPU memory share the engine may take (weights + KV cache)", 0.3)
    kv_cache_gib: float = _help("explicit KV cache size in GiB (0 = from the share on GPU, 1 GiB on CPU)", 0.0)
    sleep: bool = _help("offload weights and free the KV cache during each update (vLLM sleep mode, CUDA)", True)
    enforce_eager: bool | None = _help("no CUDA graphs / compilation (null = eager on CPU, graphs on GPU)", None)
    max_model_len: int = _help("engine context length (0 = the model's)", 0)

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm.gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})")
        _positive("vllm.kv_cache_gib", self.kv_cache_gib, strict=False)
        _positive("vllm.max_model_len", self.max_model_len, strict=False)


PARALLEL_MODES = ("ddp", "fsdp2")


@dataclass
class FSDPConfig:
    """torch's FSDP2 (`fully_shard`) over the run's processes (training.parallel=fsdp2); see
    poweropd.sharding."""

    cpu_offload: bool = _help("keep the student's sharded parameters, gradients and AdamW state in CPU memory", False)
    shard_teacher: bool = _help("shard the in-process teacher too (false: a full copy per process)", True)


TEACHER_BACKENDS = ("hf", "vllm", "server")


@dataclass
class TeacherServerConfig:
    """How the trainer talks to a served teacher (model_pair.teacher_backend=server); see
    poweropd.teacher_client."""

    timeout_s: float = _help("seconds one scoring request may take before it is retried", 120.0)
    max_retries: int = _help("retries of a failed request (refused connection, timeout, 5xx) before the run stops", 5)
    backoff_s: float = _help("wait before the first retry; doubled on each further one (capped at 30 s)", 1.0)
    concurrency: int = _help("scoring requests in flight at once", 4)
    rollouts_per_request: int = _help("rollouts scored by one request", 8)
    startup_wait_s: float = _help(
        "at start-up, wait this long for the server to answer (0: refuse at once; a SLURM job that starts "
        "the teacher beside the trainer sets several minutes)",
        0.0,
    )

    def __post_init__(self) -> None:
        for key in ("timeout_s", "concurrency", "rollouts_per_request"):
            _positive(f"model_pair.teacher_server.{key}", getattr(self, key))
        for key in ("max_retries", "backoff_s", "startup_wait_s"):
            _positive(f"model_pair.teacher_server.{key}", getattr(self, key), strict=False)


@dataclass
class ModelPairConfig:
    """Teacher and student. `kind=toy` builds the embedded pair; `kind=hf` loads hub ids or
    local paths through AutoModelForCausalLM / AutoTokenizer."""

    name: str = _help("label used in run directory names", "toy")
    kind: str = _help("toy | hf", "toy")
    teacher: str = _help("hf: hub id or local path of the teacher", "")
    student: str = _help("hf: hub id or local path of the student", "")
    revision: str | None = _help("hf: hub revision for both models", None)
    teacher_dtype: str = _help("auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16", "auto")
    student_dtype: str = _help("dtype of the student's master weights", "float32")
    attn_implementation: str = _help("transformers attention backend: sdpa | eager | flash_attention_2", "sdpa")
    enable_thinking: bool = _help("passed to the chat template (Qwen3: False = no <think> block)", False)
    instruction: str = _help("text appended to every problem before the chat template", "")
    stop_tokens: list[str] = _help("tokens that end a rollout", factory=lambda: ["<|im_end|>", "<|endoftext|>"])
    trust_remote_code: bool = _help("hf: allow custom model code from the hub", False)
    cache_dir: str = _help("toy: where built pairs are cached (env POWEROPD_CACHE)", "~/.cache/poweropd")
    use_shipped_pair: bool = _help(
        "toy: use the pair shipped with the package when the spec is its spec (false: build into cache_dir)", True
    )
    toy: ToyPairSpec = _help("toy: sizes and SFT budget of the built pair", factory=ToyPairSpec)
    teacher_backend: str = _help(
        "where the teacher runs: hf (in the trainer) | vllm (an in-process vLLM engine) | server (a vLLM server "
        "at teacher_url); vllm and server score sampled tokens and top-k only",
        "hf",
    )
    teacher_url: str = _help("teacher_backend=server: the server's base URL, http://HOST:PORT", "")
    teacher_server: TeacherServerConfig = _help(
        "teacher_backend=server: timeouts, retries, batching", factory=TeacherServerConfig
    )
    teacher_vllm: VLLMConfig = _help("teacher_backend=vllm: the teacher engine's memory settings", factory=VLLMConfig)

    def __post_init__(self) -> None:
        _one_of("model_pair.kind", self.kind, PAIR_KINDS)
        _one_of("model_pair.teacher_dtype", self.teacher_dtype, DTYPES)
        _one_of("model_pair.student_dtype", self.student_dtype, DTYPES)
        if self.kind == "hf" and not (self.teacher and self.student):
            raise ConfigError(
                "model_pair.kind=hf needs model_pair.teacher and model_pair.student (hub ids or local paths)"
            )
        if not self.stop_tokens:
            raise ConfigError("model_pair.stop_tokens must name at least one token")
        _one_of("model_pair.teacher_backend", self.teacher_backend, TEACHER_BACKENDS)
        if self.teacher_backend == "server" and not self.teacher_url.startswith(("http://", "https://")):
            raise ConfigError(
                "model_pair.teacher_backend=server needs model_pair.teacher_url=http://HOST:PORT "
                f"(got {self.teacher_url!r}); start a server with: python -m poweropd.serve teacher"
            )


@dataclass
class TrainingConfig:
    """The OPD loop. `paper` follows docs/reference.md §3; `toy` fits 2 CPU cores."""

    steps: int = _help("optimizer updates", 150)
    batch_size: int = _help("rollouts per update, summed over all processes", 32)
    rollouts_per_prompt: int = _help("rollouts sampled per prompt", 1)
    micro_batch_size: int = _help("rollouts per forward/backward pass per process (0 = all)", 0)
    gen_batch_size: int = _help("rollouts generated at once per process (0 = all)", 0)
    rollout_engine: str = _help("hf (transformers generate) | vllm (colocated engine, synced every update)", "hf")
    vllm: VLLMConfig = _help("the colocated vLLM engine (rollout_engine=vllm)", factory=VLLMConfig)
    parallel: str = _help(
        "ddp (accelerate data parallel: a full student per process) | fsdp2 (torch fully_shard: the student, its "
        "gradients and AdamW state, and the in-process teacher sharded over the processes)",
        "ddp",
    )
    fsdp: FSDPConfig = _help("FSDP2 settings (training.parallel=fsdp2)", factory=FSDPConfig)
    lr: float = _help("AdamW learning rate", 1e-4)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    adam_beta1: float = _help("AdamW beta1", 0.9)
    adam_beta2: float = _help("AdamW beta2", 0.999)
    lr_schedule: str = _help("constant | cosine (after warmup)", "constant")
    warmup_steps: int = _help("linear warmup steps", 0)
    max_grad_norm: float = _help("gradient clipping max-norm; the logged grad_norm is pre-clip", 1.0)
    max_new_tokens: int = _help("rollout length limit", 64)
    temperature: float = _help("rollout sampling temperature", 1.0)
    top_p: float = _help("rollout nucleus sampling (1.0 = off)", 1.0)
    top_k: int = _help("rollout top-k (0 = off)", 0)
    logprob_chunk_size: int = _help("tokens per lm-head chunk in the log-prob kernels", 1024)
    gradient_checkpointing: bool = _help("recompute student activations in backward", False)
    mixed_precision: str = _help("auto (bf16 on GPU, none on CPU) | no | bf16 | fp16", "auto")
    train_data: str = _help("prompt source: toy | deepscaler", "toy")
    data_dir: str | None = _help("local JSONL folder for deepscaler / math benchmarks (env POWEROPD_DATA)", None)
    val_data: str = _help("in-training validation: toy | none | a math benchmark (math500, ...)", "toy")
    val_every: int = _help("validate every N steps (0 = only before and after training)", 25)
    val_size: int = _help("validation problems, 1 sample each (a seeded random subset of a benchmark)", 128)
    val_max_new_tokens: int = _help("validation generation limit", 64)
    val_temperature: float = _help("validation temperature (0 = greedy)", 0.6)
    val_top_p: float = _help("validation top_p", 0.95)
    val_top_k: int = _help("validation top_k (0 = off)", 20)
    position_stats_every: int = _help("position-wise reward stats every K steps (0 = off)", 25)
    reward_dump_prompts: int = _help("prompts whose token rewards are dumped before training (0 = off)", 64)
    save_every: int = _help("checkpoint every N steps (0 = only at the end)", 50)
    cpu_threads: int = _help("torch CPU threads per run (0 = torch's default; 1 for parallel CPU sweeps)", 0)
    keep_checkpoints: int = _help("how many step checkpoints to keep", 1)
    allow_inexact_resume: bool = _help(
        "resume from a checkpoint that lacks some process's RNG state (the run goes on, not exactly as it would have)",
        False,
    )
    max_prompt_tokens: int = _help(
        "training prompts longer than this (tokens of the problem text) are skipped and counted", 2048
    )
    max_skipped_updates: int = _help(
        "stop the run after this many updates in a row were skipped for a non-finite loss or gradient", 3
    )

    def __post_init__(self) -> None:
        for key in (
            "steps",
            "batch_size",
            "rollouts_per_prompt",
            "lr",
            "max_new_tokens",
            "logprob_chunk_size",
            "max_prompt_tokens",
        ):
            _positive(f"training.{key}", getattr(self, key))
        for key in (
            "micro_batch_size",
            "gen_batch_size",
            "weight_decay",
            "warmup_steps",
            "val_every",
            "val_size",
            "position_stats_every",
            "reward_dump_prompts",
            "save_every",
            "cpu_threads",
            "top_k",
            "val_top_k",
        ):
            _positive(f"training.{key}", getattr(self, key), strict=False)
        _positive("training.max_grad_norm", self.max_grad_norm)
        _positive("training.temperature", self.temperature)
        _positive("training.val_temperature", self.val_temperature, strict=False)
        _positive("training.keep_checkpoints", self.keep_checkpoints)
        _positive("training.max_skipped_updates", self.max_skipped_updates)
        for key in ("top_p", "val_top_p"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"training.{key} must be in (0, 1] (got {getattr(self, key)})")
        _one_of("training.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _one_of("training.rollout_engine", self.rollout_engine, ROLLOUT_ENGINES)
        _one_of("training.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _one_of("training.parallel", self.parallel, PARALLEL_MODES)
        if self.parallel == "fsdp2" and self.mixed_precision == "fp16":
            raise ConfigError(
                "training.mixed_precision=fp16 under training.parallel=fsdp2 would need a sharded gradient scaler; "
                "use bf16 (FSDP2 gathers bf16 parameters and reduces fp32 gradients) or no"
            )
        _one_of("training.train_data", self.train_data, TRAIN_DATA)
        _one_of("training.val_data", self.val_data, VAL_DATA)
        if self.batch_size % self.rollouts_per_prompt:
            raise ConfigError(
                f"training.batch_size ({self.batch_size}) must be a multiple of "
                f"training.rollouts_per_prompt ({self.rollouts_per_prompt})"
            )


@dataclass
class LoggerConfig:
    """Where metrics go besides the run directory (which is always written)."""

    name: str = _help("local | wandb", "local")
    project: str = _help("wandb project", "poweropd")
    entity: str | None = _help("wandb entity (team or user)", None)
    mode: str = _help(
        "wandb mode: auto (online if an API key is configured, else offline) | online | offline | disabled", "auto"
    )
    tags: list[str] = _help("wandb tags", factory=list)

    def __post_init__(self) -> None:
        _one_of("logger.name", self.name, LOGGERS)
        _one_of("logger.mode", self.mode, WANDB_MODES)


@dataclass
class Config:
    seed: int = _help("seed for data order, sampling and initialisation", 0)
    output_root: str = _help("root of run directories", "outputs")
    model_pair: ModelPairConfig = field(default_factory=ModelPairConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        from poweropd.objectives import get_objective

        backend = self.model_pair.teacher_backend
        if backend != "hf" and get_objective(self.reward.name).teacher == "hidden":
            raise ConfigError(
                f"reward={self.reward.name} needs the teacher's whole distribution at every token, which "
                f"model_pair.teacher_backend={backend} does not return (it scores sampled tokens and top-k); use "
                "model_pair.teacher_backend=hf, or reward=topk_kl for a served teacher"
            )


EVAL_BACKENDS = ("hf", "vllm", "lm_eval")
LM_EVAL_MODELS = ("hf", "vllm")


@dataclass
class EvalConfig:
    """Benchmark evaluation (docs/reference.md §4): n samples per problem, graded by
    poweropd.grading; Avg@n, Pass@n, pass@k, length. Defaults are the paper's."""

    suite: str = _help("auto (toy for the toy pair, math7 otherwise) | math7 | toy | one benchmark name", "auto")
    benchmarks: list[str] = _help("evaluate only these benchmarks (overrides suite)", factory=list)
    n: int = _help("samples per problem (Avg@n, Pass@n)", 8)
    temperature: float = _help("sampling temperature (0 = greedy)", 0.6)
    top_p: float = _help("nucleus sampling", 0.95)
    top_k: int = _help("top-k (0 = off)", 20)
    max_new_tokens: int = _help("response limit; also capped by the model's context window", 4096)
    batch_size: int = _help("sequences per generate call (hf; vllm schedules a whole benchmark itself)", 64)
    backend: str = _help(
        "hf (transformers generate) | vllm (vLLM engine) | lm_eval (lm-evaluation-harness, same data and grader)", "hf"
    )
    lm_eval_model: str = _help("with backend=lm_eval: lm-eval's model type, hf or vllm", "hf")
    vllm: VLLMConfig = _help(
        "the vLLM engine (backend=vllm or lm_eval_model=vllm)", factory=lambda: VLLMConfig(gpu_memory_utilization=0.85)
    )
    limit: int | None = _help("first N problems of each benchmark (smoke runs only; null = all)", None)
    data_dir: str | None = _help("folder of <benchmark>.jsonl files (env POWEROPD_DATA); unset = hub", None)
    dtype: str = _help("model dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16", "auto")
    grade_timeout_s: float = _help("time bound per graded answer; a timeout counts as incorrect", 5.0)
    overwrite: bool = _help("redo benchmarks already evaluated with other settings", False)

    def __post_init__(self) -> None:
        for key in ("n", "max_new_tokens", "batch_size", "grade_timeout_s"):
            _positive(f"eval.{key}", getattr(self, key))
        _positive("eval.temperature", self.temperature, strict=False)
        _positive("eval.top_k", self.top_k, strict=False)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"eval.top_p must be in (0, 1] (got {self.top_p})")
        if self.limit is not None:
            _positive("eval.limit", self.limit)
        _one_of("eval.backend", self.backend, EVAL_BACKENDS)
        _one_of("eval.lm_eval_model", self.lm_eval_model, LM_EVAL_MODELS)
        _one_of("eval.dtype", self.dtype, DTYPES)


@dataclass
class EvaluateConfig:
    """What evaluate.py evaluates: a training run's student (`run_dir`), or `model`
    (student / teacher of `model_pair`, or any Hugging Face id or path)."""

    run_dir: str | None = _help("a training run directory; its saved config supplies the model pair", None)
    sweep_dir: str | None = _help("evaluate every finished run under this folder (e.g. a multirun sweep)", None)
    checkpoint: str = _help("with run_dir: final | latest | step_000100 ...", "final")
    model: str = _help("without run_dir: student | teacher (of model_pair) | a HF hub id or local path", "student")
    seed: int = _help("sampling seed", 0)
    output_root: str = _help("results of models outside a run go to <output_root>/evals/<name>/eval/", "outputs")
    model_pair: ModelPairConfig = field(default_factory=ModelPairConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore (conf/config.yaml lists it first in its
    defaults) and register the resolvers the YAML uses."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="schema", node=Config)
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
    if not OmegaConf.has_resolver("method_tag"):
        OmegaConf.register_new_resolver("method_tag", _method_tag)
    if not OmegaConf.has_resolver("pair_name"):
        OmegaConf.register_new_resolver("pair_name", pair_name)


def pair_name(preset: str, teacher: str, student: str, preset_teacher: str, preset_student: str) -> str:
    """The label of a named pair (run directories, summary.json, the analysis' grouping): the
    preset's name while it runs the preset's own models, else one derived from the models
    actually loaded, so that a preset pointed at other folders is never filed under the
    paper's pair (model_pair.name=... sets a label of your own)."""
    if (str(teacher), str(student)) == (str(preset_teacher), str(preset_student)):
        return preset
    return f"custom-{_slug(teacher)}-{_slug(student)}"


def _slug(model: str) -> str:
    last = str(model).rstrip("/\\").replace("\\", "/").split("/")[-1] or "model"
    return re.sub(r"[^a-z0-9._]+", "-", last.lower()).strip("-") or "model"


def _method_tag(reward) -> str:
    from poweropd.objectives import method_tag

    return method_tag(reward)


def to_config(cfg, schema: type = None):
    """DictConfig (composed by Hydra) -> validated dataclasses. Raises ConfigError."""
    schema = schema or Config
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _reject_unknown_keys(cfg, schema, "")  # `+key=...` appends slip past the struct flag
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise ConfigError(_omegaconf_one_line(exc)) from None
    if not isinstance(obj, schema):  # composed without the schema (should not happen)
        raise ConfigError("config was not composed against the poweropd schema (conf/config.yaml defaults)")
    return obj


def _reject_unknown_keys(node, cls, prefix: str) -> None:
    from omegaconf import DictConfig

    fields = schema_fields(cls)
    hints = typing.get_type_hints(cls)
    for key in node.keys():
        if key not in fields:
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; valid keys under {where}: {', '.join(sorted(fields))}"
            )
        value = node._get_node(key)
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(hints[key]):
            _reject_unknown_keys(value, hints[key], f"{prefix}{key}.")


def _omegaconf_one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    key = getattr(exc, "full_key", None)
    return f"{key}: {text[0]}" if key else text[0]


def schema_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}
