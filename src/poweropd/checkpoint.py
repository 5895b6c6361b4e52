"""Checkpoints that survive SIGKILL.

    checkpoints/step_000050/
        config.json, model.safetensors, tokenizer files   the student (save_pretrained)
        state/                                            accelerate.save_state: model,
                                                          optimizer, RNG of every process
        trainer_state.json                                step, data position, run facts
    checkpoints/latest                                    "step_000050"

A checkpoint is written into a temporary folder, verified (every file there, the saved
weights readable and finite), renamed into place, and only then does `latest` move to it and
do older checkpoints get pruned: a kill or a failure at any moment leaves either the previous
complete checkpoint or the new one, never half of one, and never removes the last good one.
Non-finite weights are never written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from poweropd.tracking import CHECKPOINTS, write_text_atomic

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    path = run_dir / CHECKPOINTS / pointer.read_text().strip()
    return path if (path / TRAINER_STATE).exists() else None


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or did not verify; the previous one is kept."""


def weights_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


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


def save_checkpoint(run_dir: Path, step: int, accelerator, lm, tokenizer, trainer_state: dict, keep: int) -> Path:
    root = run_dir / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    if accelerator.is_main_process:
        accelerator.unwrap_model(lm).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        verify_checkpoint(tmp, accelerator.unwrap_model(lm))  # before anything older is touched
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, final.name)
        _prune(root, keep, final.name)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, accelerator) -> dict:
    """Restore model, optimizer and RNG states in place; return the trainer state."""
    accelerator.load_state(str(path / "state"))
    return json.loads((path / TRAINER_STATE).read_text())
