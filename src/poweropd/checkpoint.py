"""Checkpoints that survive SIGKILL.

    checkpoints/step_000050/
        config.json, model.safetensors, tokenizer files   the student (save_pretrained)
        state/                                            accelerate.save_state: model,
                                                          optimizer, RNG of every process
        trainer_state.json                                step, data position, run facts
    checkpoints/latest                                    "step_000050"

A checkpoint is written into a temporary folder and renamed into place, and `latest` is
replaced atomically afterwards, so a kill at any moment leaves either the previous
complete checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from poweropd.tracking import CHECKPOINTS

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
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / LATEST)
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
