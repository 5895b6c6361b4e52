"""Checkpoints that survive SIGKILL.

    checkpoints/step_000050/
        config.json, model.safetensors, tokenizer files,  the student in fp32 (save_pretrained),
        generation_config.json                            the one copy a resume loads
        state/                                            accelerate.save_state without the
                                                          model: optimizer.bin, the RNG of every
                                                          process (random_states_<rank>.pkl)
        trainer_state.json                                step, data position, run facts
    checkpoints/latest                                    "step_000050"

The student is stored once, so a checkpoint is about 12 bytes per student parameter: 4 for
the fp32 weights, 8 for AdamW's two moments. Under training.parallel=fsdp2 (`ShardedState`)
state/ holds `optimizer_dcp/` (the sharded AdamW state, torch.distributed.checkpoint) instead
of optimizer.bin; the student is the same consolidated folder.

A checkpoint is written into a temporary folder, verified (every file there, the saved
weights readable and finite), renamed into place, and only then does `latest` move to it and
do older checkpoints get pruned: a kill or a failure at any moment leaves either the previous
complete checkpoint or the new one, never half of one, and never removes the last good one.
Non-finite weights are never written; a full disk fails the save in one line and leaves the
previous checkpoint as it was.

Resuming (`resume_from_newest`) does not trust `latest`: it tries the step folders newest
first, skips each one that is incomplete, unreadable or fails to load (saying why, in one
line), and refuses rather than starting over when checkpoints exist but none can be used.
A checkpoint without the RNG state of every process would resume inexactly (other rollouts
than an uninterrupted run): it is skipped unless training.allow_inexact_resume=true.

A checkpoint being read by another process (`evaluate.py checkpoint=latest` while the run
trains) holds a shared lock (`in_use`) that pruning respects.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from poweropd.errors import ConfigError
from poweropd.files import FileProblem, is_disk_full, read_json_object, try_lock, write_text_atomic
from poweropd.stats import any_process
from poweropd.tracking import CHECKPOINTS

log = logging.getLogger(__name__)

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
IN_USE = ".in_use"
SHARDED_OPTIMIZER = "optimizer_dcp"  # state/ of an FSDP2 checkpoint
ONE_FILE = "10000GB"  # save_pretrained's shard limit: the student is always one model.safetensors


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def step_checkpoints(run_dir: Path) -> list[Path]:
    """Every step folder under checkpoints/, newest first (temporaries excluded)."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """What `latest` names when that checkpoint is usable, else the newest usable step folder."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    with contextlib.suppress(OSError):
        named = Path(run_dir) / CHECKPOINTS / pointer.read_text().strip()
        if pointer.read_text().strip() and unusable(named) is None:
            return named
    return next((p for p in step_checkpoints(run_dir) if unusable(p) is None), None)


class CheckpointError(ConfigError):
    """A checkpoint could not be written or did not verify; the previous one is kept."""


def unusable(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (cheap checks: files present,
    trainer state parseable, safetensors headers whole), or None."""
    from safetensors import safe_open

    if not (path / TRAINER_STATE).is_file():
        return f"no {TRAINER_STATE}"
    try:
        state = read_json_object(path / TRAINER_STATE)
        int(state["step"])
    except FileProblem as exc:
        return str(exc).split(";")[0].replace(str(path) + "/", "")
    except (KeyError, TypeError, ValueError):
        return f"{TRAINER_STATE} has no step"
    state_dir = path / "state"
    names = {p.name for p in state_dir.iterdir()} if state_dir.is_dir() else set()
    sharded = SHARDED_OPTIMIZER in names
    if not any(n.startswith("optimizer") for n in names):
        return "state/ holds no optimizer state"
    if sharded and not (state_dir / SHARDED_OPTIMIZER / ".metadata").is_file():
        return f"state/{SHARDED_OPTIMIZER} has no .metadata"
    # The student is the top-level folder (checkpoints written before it was stored once also
    # hold a copy in state/, which is not read).
    weights = path / "model.safetensors"
    if not weights.is_file() or weights.stat().st_size == 0:
        return "model.safetensors is missing or empty"
    try:
        with safe_open(str(weights), framework="pt") as saved:
            saved.keys()
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        return f"model.safetensors is corrupt ({str(exc).splitlines()[0][:80]})"
    optimizer = state_dir / "optimizer.bin"
    if optimizer.exists() and optimizer.stat().st_size == 0:
        return "state/optimizer.bin is empty"
    return None


def _rng_unreadable(path: Path, rank: int, allow_inexact: bool) -> str | None:
    """accelerate only logs a random-state file it cannot unpickle; read it here first."""
    rng = path / "state" / f"random_states_{rank}.pkl"
    if not rng.is_file():
        return None  # missing: decided by missing_rng_states
    try:
        torch.load(rng, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - pickle / zip / EOF: unreadable either way
        if allow_inexact:
            log.warning("%s is unreadable (%s): resuming without it", rng, exc.__class__.__name__)
            return None
        return f"{rng.name} is unreadable ({exc.__class__.__name__}; training.allow_inexact_resume=true accepts it)"
    return None


def missing_rng_states(path: Path, processes: int) -> list[str]:
    return [
        f"random_states_{i}.pkl"
        for i in range(processes)
        if not (path / "state" / f"random_states_{i}.pkl").is_file()
        or (path / "state" / f"random_states_{i}.pkl").stat().st_size == 0
    ]


def resume_from_newest(run_dir: Path, accelerator, state, allow_inexact: bool = False) -> tuple[Path, dict] | None:
    """Load the newest checkpoint that can be resumed from (model, optimizer and RNG restored
    in place by `state`, an AccelerateState or a ShardedState); returns (its path, its
    trainer state), or None when the run has none. Raises ConfigError when checkpoints exist
    but none can be used."""
    candidates = step_checkpoints(run_dir)
    if not candidates:
        return None
    skipped: list[str] = []
    for path in candidates:
        reason = unusable(path)
        missing = [] if reason else missing_rng_states(path, accelerator.num_processes)
        if missing and not allow_inexact:
            reason = f"no {', '.join(missing)} (not an exact resume; training.allow_inexact_resume=true accepts it)"
        reason = reason or _rng_unreadable(path, accelerator.process_index, allow_inexact)
        trainer_state = None
        # Every process agrees before loading (an FSDP2 load is a collective), and again after.
        if any_process(accelerator, reason is not None):
            skipped.append(f"{path.name}: {reason or 'not usable on another process'}")
            continue
        if reason is None:
            try:
                trainer_state = load_checkpoint(path, state)
            except Exception as exc:  # noqa: BLE001 - torch / pickle / safetensors: any failure means "skip it"
                first = str(exc).splitlines()[0][:100] if str(exc) else ""
                reason = f"does not load ({exc.__class__.__name__}: {first})"
        # every process resumes from the same checkpoint: one that failed anywhere is skipped everywhere
        if any_process(accelerator, reason is not None):
            skipped.append(f"{path.name}: {reason or 'does not load on another process'}")
            continue
        if missing:
            log.warning(
                "resuming from %s without %s: the run continues, but not exactly as it would have",
                path.name,
                ", ".join(missing),
            )
        if skipped:
            log.warning("resuming from %s; skipped newer checkpoint(s): %s", path.name, "; ".join(skipped))
        return path, trainer_state
    raise ConfigError(
        f"{Path(run_dir) / CHECKPOINTS} holds {len(candidates)} checkpoint(s) but none can be resumed from "
        f"({'; '.join(skipped)}); restore one, or move checkpoints/ away to start the run over"
    )


@contextlib.contextmanager
def checkpoint_in_use(path: Path):
    """Hold a shared lock on a checkpoint while it is read, so that pruning leaves it alone."""
    lock = Path(path) / IN_USE
    try:
        handle = open(lock, "a")  # noqa: SIM115
    except OSError:  # pruned before we got here, or read-only: nothing to protect
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield


def weights_finite(model) -> bool:
    """Whether every weight is finite (this process's shards of a sharded model: see
    poweropd.sharding.all_finite for the answer of every process)."""
    from poweropd.sharding import local

    return all(bool(torch.isfinite(local(p)).all()) for p in model.parameters())


def verify_checkpoint(path: Path, lm) -> None:
    """Raise CheckpointError unless `path` holds a complete, readable, finite checkpoint."""
    from safetensors import safe_open

    for name in (TRAINER_STATE, "config.json", "model.safetensors"):
        if not (path / name).is_file() or (path / name).stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} lacks {name}")
    if not (path / "state").is_dir() or not any((path / "state").iterdir()):
        raise CheckpointError(f"checkpoint {path} lacks its optimizer/RNG state")
    with safe_open(str(path / "model.safetensors"), framework="pt") as saved:
        keys = set(saved.keys())
        tied = {"lm_head.weight"} if lm.config.tie_word_embeddings else set()  # save_pretrained drops it
        missing = set(lm.state_dict()) - tied - keys
        if missing:
            raise CheckpointError(f"checkpoint {path} misses weights: {sorted(missing)[:3]}")
        for key in keys:
            if not bool(torch.isfinite(saved.get_tensor(key)).all()):
                raise CheckpointError(f"checkpoint {path} holds non-finite values in {key}")


def save_checkpoint(run_dir: Path, step: int, accelerator, state, tokenizer, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint `step`: `state` (an AccelerateState or a ShardedState) writes the
    student and the optimizer/RNG state, every process taking part."""
    root = run_dir / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    main = accelerator.is_main_process
    # Each stage ends with every process agreeing it went well, so that a failure on one of
    # them (a full disk, a failed verification) stops all of them at the same place.
    stages = [
        lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)) if main else None,
        lambda: state.save_state(tmp / "state"),
        lambda: state.save_student(tmp),
        lambda: _finish_and_verify(tmp, step, state.lm, tokenizer, trainer_state) if main else None,
    ]
    for stage in stages:
        error = None
        try:
            stage()
        except Exception as exc:  # noqa: BLE001 - handed on below, on every process
            error = exc
        if any_process(accelerator, error is not None):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = latest_checkpoint(run_dir)
            intact = f"the last verified checkpoint {kept.name} is intact" if kept else "no earlier checkpoint exists"
            if error is None:
                raise CheckpointError(f"writing checkpoint {final.name} failed on another process; {intact}")
            if is_disk_full(error):
                raise CheckpointError(
                    f"writing checkpoint {final.name} failed: no space left on device in {root}; {intact}; "
                    "free space and run the same command to resume"
                ) from None
            raise error
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, final.name)
        _prune(root, keep, final.name)
    accelerator.wait_for_everyone()
    return final


def _finish_and_verify(tmp: Path, step: int, lm, tokenizer, trainer_state: dict) -> None:
    tokenizer.save_pretrained(tmp)
    (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    verify_checkpoint(tmp, lm)  # before anything older is touched


def _prune(root: Path, keep: int, newest: str) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        if old.name == newest:
            continue
        try:
            handle = open(old / IN_USE, "a")  # noqa: SIM115
        except OSError:  # gone already, or not writable: nothing to prune
            continue
        with handle:
            if not try_lock(handle):  # another process is reading it: pruned at the next save
                log.info("not pruning %s: another process is reading it", old.name)
                continue
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, state) -> dict:
    """Restore model, optimizer and RNG states in place; return the trainer state."""
    trainer_state = read_json_object(path / TRAINER_STATE)
    state.load(path)
    return trainer_state


class AccelerateState:
    """What a data-parallel checkpoint holds besides the trainer state: the student
    (save_pretrained, from the main process) and accelerate's save_state without the model
    (optimizer, gradient scaler under fp16, the RNG of every process). The model is left out
    through accelerate's save/load pre-hooks, which exist for this: the student is written
    once, by save_pretrained, and a resume loads it from there."""

    def __init__(self, accelerator, scorer, generation=None):
        self.accelerator = accelerator
        self.lm = accelerator.unwrap_model(scorer).lm
        self.generation = generation

    def save_student(self, folder: Path) -> None:
        if self.accelerator.is_main_process:
            with exported_generation(self.lm, self.generation):
                self.lm.save_pretrained(folder, safe_serialization=True, max_shard_size=ONE_FILE)

    def save_state(self, folder: Path) -> None:
        handle = self.accelerator.register_save_state_pre_hook(lambda models, weights, _dir: weights.clear())
        try:
            self.accelerator.save_state(str(folder))
        finally:
            handle.remove()

    def load(self, path: Path) -> None:
        from poweropd.sharding import copy_student

        copy_student(self.lm, path)
        handle = self.accelerator.register_load_state_pre_hook(lambda models, _dir: models.clear())
        try:
            self.accelerator.load_state(str(path / "state"))
        finally:
            handle.remove()


class ShardedState:
    """An FSDP2 checkpoint (poweropd.sharding): the student once, consolidated on the main
    process (and loaded back by broadcasting it), the AdamW state sharded (DCP), and the RNG
    of every process. Every method is a collective."""

    def __init__(self, accelerator, scorer, optimizer, generation=None):
        self.accelerator, self.scorer, self.optimizer = accelerator, scorer, optimizer
        self.lm = scorer.lm
        self.generation = generation

    def save_student(self, folder: Path) -> None:
        from poweropd.sharding import full_state_dict

        weights = full_state_dict(self.lm)  # every process gathers, the main one receives
        if self.accelerator.is_main_process:
            with exported_generation(self.lm, self.generation):
                self.lm.save_pretrained(folder, state_dict=weights, safe_serialization=True, max_shard_size=ONE_FILE)

    def save_state(self, folder: Path) -> None:
        from poweropd.sharding import save_optimizer

        folder.mkdir(parents=True, exist_ok=True)
        save_optimizer(self.scorer, self.optimizer, folder / SHARDED_OPTIMIZER)
        torch.save(rng_state(), folder / f"random_states_{self.accelerator.process_index}.pkl")

    def load(self, path: Path) -> None:
        from poweropd.sharding import load_full_state_dict, load_optimizer

        load_full_state_dict(self.lm, path if self.accelerator.is_main_process else None)
        load_optimizer(self.scorer, self.optimizer, path / "state" / SHARDED_OPTIMIZER)
        rng = path / "state" / f"random_states_{self.accelerator.process_index}.pkl"
        if rng.is_file():  # missing only when training.allow_inexact_resume accepted that
            set_rng_state(torch.load(rng, weights_only=False))


@contextlib.contextmanager
def exported_generation(lm, generation):
    """`lm` carrying `generation` (a GenerationConfig) while it is saved: the exported folder
    then stops and samples as the run does (transformers and vLLM read generation_config.json),
    while the live model keeps the neutral config its rollouts are drawn with."""
    kept = lm.generation_config
    if generation is not None:
        lm.generation_config = generation
    try:
        yield
    finally:
        lm.generation_config = kept


def rng_state() -> dict:
    """Every RNG this process draws from (Python, NumPy, torch CPU and CUDA)."""
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
