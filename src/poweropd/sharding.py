"""FSDP2 for the trainer (training.parallel=fsdp2): torch's own `fully_shard`, nothing home-made.

What is sharded, and how (docs/parallel.md has the memory model):

- The student: every decoder layer is one FSDP unit, and the `StudentScorer` wrapping it is
  the root unit. The root owns what is left (embeddings, final norm, lm-head; one tensor when
  they are tied), so the lm-head weight the chunked loss kernels read is the root's gathered
  parameter for the whole forward and backward of a micro-batch (resharded after the
  backward): the kernels see a plain tensor, and its gradient is reduce-scattered with the
  rest. Gradients are reduce-scattered after every micro-batch (sharded accumulation, no
  full-size gradient buffer), averaged over processes, which the trainer's loss weights
  undo exactly as under DDP.
- AdamW holds DTensor shards, so its state is sharded too. `training.mixed_precision=bf16`
  becomes a MixedPrecisionPolicy (bf16 all-gathers and compute, fp32 master weights and fp32
  gradient reduction) instead of autocast; `training.fsdp.cpu_offload` keeps shards,
  gradients and optimizer state in CPU memory (torch's CPUOffloadPolicy).
- An in-process teacher (model_pair.teacher_backend=hf, training.fsdp.shard_teacher): its
  decoder layers are units under a frozen root that reshards after every forward. For the
  vocabulary objectives, which multiply the teacher's lm-head inside the student's kernels,
  the teacher head is gathered once per update and released when the update's losses are
  formed (HFTeacher.release).
- Generation (the hf engine, validation, the reward dump) runs on the gathered student:
  `gathered_for_generation` all-gathers every unit once and keeps it gathered for the whole
  `generate`, so no collective runs per token and processes may finish at different steps.
- Checkpoints (poweropd.checkpoint): the student is written once, consolidated
  (`save_pretrained` of the full state dict gathered on the main process) and loaded back by
  broadcasting it from there; the optimizer state is written sharded with
  torch.distributed.checkpoint (DCP), which reshards on load.

Every function here is a collective: all processes call it, in the same order.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

try:  # torch >= 2.6
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - the pinned torch has them
    FSDPModule = DTensor = None

OPTIMIZER_DIR = "optimizer_dcp"  # inside a checkpoint's state/: the sharded AdamW state


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM: the modules its `_no_split_modules`
    names (the unit accelerate and transformers' own FSDP wrapping use), else the decoder's
    `.layers`."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        layers = list(getattr(lm.get_decoder(), "layers", []))
    if not layers:
        from poweropd.errors import ConfigError

        raise ConfigError(
            f"{type(lm).__name__} names no decoder-layer class (_no_split_modules) and has no .layers; "
            "training.parallel=fsdp2 shards per decoder layer, so use training.parallel=ddp for this model"
        )
    return layers


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_student(scorer: nn.Module, device: torch.device, mixed_precision: str, cpu_offload: bool) -> nn.Module:
    """Shard `scorer` (a StudentScorer) in place: decoder layers, then the scorer as root."""
    kwargs = {"mesh": _mesh(device)}
    if mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())  # pinning needs a GPU
    source = _main_weights(scorer.lm)
    for layer in decoder_layers(scorer.lm):
        fully_shard(layer, **kwargs)
    fully_shard(scorer, **kwargs)
    _fill_from_main(scorer.lm, source, device)
    _init_root(scorer)
    return scorer


def _init_root(root: nn.Module) -> None:
    """Make `root` the FSDP root now. FSDP2 decides the root at the first forward, and the
    first forward of a run may be a rollout's, which enters the model below the scorer."""
    root._get_fsdp_state()._lazy_init()


class TeacherRoot(nn.Module):
    """The frozen in-process teacher as an FSDP root: its forward is poweropd.models.score_teacher."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, need: str, input_ids_BS, attention_mask_BS, prompt_len: int, mask_BT, chunk: int, k: int = 0):
        from poweropd.models import score_teacher

        return score_teacher(self.lm, need, input_ids_BS, attention_mask_BS, prompt_len, mask_BT, chunk, k)


def shard_teacher(lm: nn.Module, device: torch.device) -> TeacherRoot:
    """Shard a frozen teacher: decoder layers, then a root that reshards after each forward
    (an FSDP root would otherwise keep its parameters gathered for a backward that never comes)."""
    mesh = _mesh(device)
    source = _main_weights(lm)
    for layer in decoder_layers(lm):
        fully_shard(layer, mesh=mesh)
    root = TeacherRoot(lm)
    fully_shard(root, mesh=mesh, reshard_after_forward=True)
    _fill_from_main(lm, source, device)
    _init_root(root)
    return root


def _main_weights(lm: nn.Module) -> dict | None:
    """Before sharding: the main process's full weights (references, no copy), {} on the
    others (whose models were built on the meta device: poweropd.models.load_pair), None
    when there is one process (its model is whole already)."""
    if dist.get_world_size() == 1:
        return None
    return dict(lm.state_dict()) if dist.get_rank() == 0 else {}


def _fill_from_main(lm: nn.Module, source: dict | None, device: torch.device) -> None:
    """After sharding: every process's shards from the main process's full weights, by
    broadcast, so that only the main process ever read the checkpoint. Buffers that are not
    in a state dict (the rotary inverse frequencies) are broadcast as they are."""
    if source is None:
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in (*lm.parameters(), *lm.buffers())):
        lm.to_empty(device=device)
    set_model_state_dict(lm, source, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    source.clear()  # the broadcast leaves the main process's source tensors unusable: drop them
    for buffer in lm.buffers():
        if buffer.device != device:  # an offloaded or CPU-kept buffer: broadcast from where it lives
            buffer.data = buffer.data.to(device)
        dist.broadcast(buffer, src=0)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered into a plain tensor (a collective); any other tensor as it is."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def clip_grad_norm(parameters, max_norm: float) -> float:
    """torch's clip_grad_norm_ on (sharded) gradients; the pre-clip total norm of the whole
    model, the same number on every process."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return float(full_tensor(norm))


def all_finite(model: nn.Module) -> bool:
    """Whether every weight of `model` is finite on every process."""
    ok = all(bool(torch.isfinite(local(p)).all()) for p in model.parameters())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=_any_device(model))
        dist.all_reduce(flag)
        ok = int(flag.item()) == 0
    return ok


def _any_device(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    # gloo reduces CPU tensors; NCCL needs the process's GPU (a CPU-offloaded shard lives on the CPU)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return local(p).device if local(p).device.type == "cpu" else torch.device("cpu")


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if FSDPModule is not None and isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_for_generation(root: nn.Module):
    """Every FSDP unit of `root` all-gathered for the duration (one collective per unit on
    entry), and kept gathered across forwards, so `generate` runs no collective per token.
    Costs the gathered model's memory while generating, like any rollout engine."""
    units = fsdp_units(root)
    for unit in units:
        if unit is not root:
            unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            if unit is not root:
                unit.set_reshard_after_forward(True, recurse=False)


# ----------------------------------------------------------------------------------------
# State dicts and checkpoints


def full_tensors(lm: nn.Module, dtype: torch.dtype | None = None):
    """(name, full tensor) of the student's state dict, gathered one tensor at a time on every
    process, in `dtype` when given: a colocated engine's weight sync holds one gathered
    tensor at a time, not the whole fp32 student. Every process must consume it in order."""
    for name, tensor in lm.state_dict().items():
        full = full_tensor(tensor)
        yield name, full if dtype is None or not full.is_floating_point() else full.to(dtype)


def full_state_dict(lm: nn.Module, everywhere: bool = False) -> dict:
    """The student's full state dict, gathered: on the main process only (on the CPU), or on
    every process (`everywhere`, on the process's device: a colocated engine's weight sync)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    return get_model_state_dict(lm, options=options)


def saved_sources(lm, saved: set[str], folder: Path) -> dict[str, str]:
    """For every state-dict key of `lm`, the tensor of a save_pretrained file (keys `saved`)
    it is read from: its own, or, for the tied copies save_pretrained leaves out (a tied
    lm-head), the one it shares. KeyError for a weight the file lacks or one `lm` lacks."""
    params = dict(lm.named_parameters(remove_duplicate=False))
    keys = list(lm.state_dict())
    unknown = saved - set(keys)
    if unknown:
        raise KeyError(f"{folder} holds weights the model has not: {sorted(unknown)[:3]}")
    sources = {}
    for key in keys:
        target = params.get(key)
        sources[key] = key if key in saved else next(
            (n for n, p in params.items() if target is not None and p is target and n in saved), None
        )  # fmt: skip
        if sources[key] is None:
            raise KeyError(f"{folder} has no weight {key}")
    return sources


def read_student(lm, folder: Path) -> dict:
    """The full state dict of `lm` from the save_pretrained folder `folder` (one model.safetensors)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / "model.safetensors"))
    return {key: state[source] for key, source in saved_sources(lm, set(state), folder).items()}


@torch.no_grad()
def copy_student(lm, folder: Path) -> None:
    """Load the save_pretrained folder `folder` into the unsharded `lm` in place, one tensor at a
    time (the host never holds the whole student: several processes on one node each load)."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as saved:
        sources = saved_sources(lm, set(saved.keys()), folder)
        state = lm.state_dict()
        for key, source in sources.items():  # every shape first: a refused file leaves the model as it was
            shape = tuple(saved.get_slice(source).get_shape())
            if shape != tuple(state[key].shape):
                raise ValueError(f"{folder}: {key} has shape {shape}, the model {tuple(state[key].shape)}")
        for key, source in sources.items():
            state[key].copy_(saved.get_tensor(source))


def load_full_state_dict(lm: nn.Module, path: Path | None) -> None:
    """Load a consolidated `save_pretrained` folder into the sharded `lm`: the main process
    reads it (`path`; None elsewhere) and broadcasts it to the others' shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state: dict = {}
    problem = ""
    if path is not None:
        try:
            state = read_student(lm, path)
        except Exception as exc:  # noqa: BLE001 - told to every process below, then raised on each
            problem = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    told = [problem]
    dist.broadcast_object_list(told, src=0)  # the others must not wait in a broadcast that never comes
    if told[0]:
        raise RuntimeError(f"the main process could not read the student ({told[0]})")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(lm, state, options=options)


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The sharded AdamW state, written by every process into `folder` (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    stepped = bool(optimizer.state)
    # torch fills an empty optimizer's state with a zero-gradient, lr-0 step to describe it;
    # an optimizer that never stepped (every update so far skipped) must stay unstepped.
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer), "stepped": stepped}, checkpoint_id=str(folder))
    if not stepped:
        optimizer.state.clear()


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore the AdamW state written by `save_optimizer` (any number of processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer), "stepped": True}
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if not state["stepped"]:
        optimizer.state.clear()
