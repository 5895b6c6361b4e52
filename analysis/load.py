"""Run directories -> DataFrames.

A run is a directory holding `.hydra/config.yaml` (single runs, Hydra multirun sweeps, any
nesting, several roots); its values are read from `run_config.json` (the validated config
the run started with) when present, else from the Hydra config. Nothing is parsed out of
directory or W&B run names.

    runs    one row per run: `run_id`, `run_dir`, `finished`, `status`, `method` (the paper's
            label), `group` (runs that differ only in seed share it), `label` (method, plus
            the keys that tell groups of one method apart), `command`, the config flattened
            into override names (`reward.name`, `reward.alpha`, `model_pair.name`, `seed`,
            `training.lr`, ...), `summary.<key>`, and evaluation results as
            `eval.<suite>.<benchmark>.<metric>`. Models evaluated outside a run
            (`outputs/evals/<name>`) become reference rows (`kind == "reference"`).
    curves  the metrics.jsonl files as a long table: run_id, step, metric, value.

Unfinished runs are kept but flagged (`finished == False`); tables leave them out. Unreadable
lines are reported as "file:line" in `RunSet.problems`, and the rest still loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from analysis.labels import method_sort_key
from poweropd.objectives import method_label
from poweropd.tracking import flatten

SKIP_DIRS = {".hydra", "checkpoints", "student", "eval", "wandb", "figures", "tables", "__pycache__"}
# Keys that differ between repeats of one configuration without changing it.
NOT_CONFIG = ("seed", "output_root", "model_pair.cache_dir", "training.data_dir", "logger.")


@dataclass
class RunSet:
    runs: pd.DataFrame
    curves: pd.DataFrame
    problems: list[str] = field(default_factory=list)

    @property
    def finished(self) -> pd.DataFrame:
        return self.runs[self.runs["finished"] & (self.runs["kind"] == "run")]


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory under `root` (or `root` itself) that holds a saved Hydra config and
    something of a run (a launch refused before training leaves only Hydra's own files, and
    is not a run)."""
    found = []
    for here, dirs, files in os.walk(root):
        path = Path(here)
        if (path / ".hydra" / "config.yaml").is_file() and (set(files) | set(dirs)) - {".hydra", "run.log"}:
            found.append(path)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
    return found


def find_reference_dirs(root: Path) -> list[Path]:
    """Models evaluated outside any run: `<...>/evals/<name>/eval/<suite>.json` (the root may
    be that `evals` folder itself)."""
    found = Path(root).rglob("eval/*.json")
    return sorted({p.parent.parent for p in found if p.parent.parent.parent.name == "evals"})


def load_runs(roots: list[str | Path] | str | Path) -> RunSet:
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    rows, curves, problems = [], [], []
    seen: set[Path] = set()
    for root in map(Path, roots):
        if not root.exists():
            problems.append(f"{root}: does not exist")
            continue
        for run_dir in find_run_dirs(root):
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            row, run_curves = _load_run(run_dir, root, problems)
            rows.append(row)
            curves.extend(run_curves)
        for ref_dir in find_reference_dirs(root):
            if ref_dir.resolve() not in seen:
                seen.add(ref_dir.resolve())
                rows.append(_load_reference(ref_dir, root, problems))
    runs = pd.DataFrame(rows)
    if runs.empty:
        runs = pd.DataFrame(columns=["run_id", "run_dir", "kind", "finished", "method", "group", "label"])
    else:
        runs = _label_groups(runs)
        runs = runs.sort_values(["kind", "label", "seed"], key=_sort_column, ignore_index=True)
    curves_df = pd.DataFrame(curves, columns=["run_id", "step", "metric", "value"])
    return RunSet(runs, curves_df, problems)


def _sort_column(col: pd.Series) -> pd.Series:
    if col.name == "label":
        return col.map(lambda v: method_sort_key(str(v)))
    if col.name == "kind":
        return col.map(lambda v: 0 if v == "reference" else 1)
    return col


def _read_config(run_dir: Path, problems: list[str]) -> dict:
    saved = run_dir / "run_config.json"
    if saved.is_file():
        try:
            return json.loads(saved.read_text())
        except json.JSONDecodeError as exc:
            problems.append(f"{saved}:{exc.lineno}: unreadable ({exc.msg}); using .hydra/config.yaml")
    first = run_dir / ".hydra" / "first_launch" / "config.yaml"
    path = first if first.is_file() else run_dir / ".hydra" / "config.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        problems.append(f"{path}: unreadable YAML ({str(exc).splitlines()[0]})")
        return {}


def _command(run_dir: Path, script: str = "run.py") -> str:
    first = run_dir / ".hydra" / "first_launch" / "overrides.yaml"
    path = first if first.is_file() else run_dir / ".hydra" / "overrides.yaml"
    try:
        overrides = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return ""
    return " ".join(["python", script, *_primary_config_flags(run_dir), *(shlex.quote(str(o)) for o in overrides)])


def _primary_config_flags(run_dir: Path) -> list[str]:
    """`-cd sweeps -cn <file>` when the run came from a sweep file rather than conf/config.yaml,
    so that the command carries the sweep file's settings too."""
    try:
        hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []
    name = hydra.get("job", {}).get("config_name")
    if not name or name == "config":
        return []
    for source in hydra.get("runtime", {}).get("config_sources", []):
        folder = Path(str(source.get("path", "")))
        if source.get("schema") == "file" and (folder / f"{name}.yaml").is_file():
            return ["-cd", folder.name, "-cn", name]
    return ["-cn", name]


def _load_run(run_dir: Path, root: Path, problems: list[str]) -> tuple[dict, list[tuple]]:
    run_id = _run_id(run_dir, root)
    config = flatten(_read_config(run_dir, problems))
    summary = _read_json(run_dir / "summary.json", problems)
    finished = bool(summary) and summary.get("status") == "finished"
    row = {
        "run_id": run_id,
        "run_dir": str(run_dir),
        "kind": "run",
        "finished": finished,
        "status": summary.get("status", "unfinished") if summary else "unfinished",
        "command": _command(run_dir),
        "method": method_label({k: v for k, v in config.items() if k.startswith("reward.")}),
        **config,
        **{f"summary.{k}": v for k, v in summary.items() if not isinstance(v, (list, dict))},
        **_eval_columns(run_dir, problems),
    }
    curves = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for lineno, record in _jsonl(metrics, problems):
            step = record.get("step")
            if not isinstance(step, int):
                problems.append(f"{metrics}:{lineno}: no integer 'step' (skipped)")
                continue
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    if math.isfinite(value):
                        curves.append((run_id, step, key, float(value)))
    elif finished:
        problems.append(f"{run_dir}: finished but has no metrics.jsonl")
    return row, curves


def _load_reference(ref_dir: Path, root: Path, problems: list[str]) -> dict:
    name = ref_dir.name
    label = "Teacher" if name.endswith("_teacher") else "Student (untrained)" if name.endswith("_student") else name
    return {
        "run_id": _run_id(ref_dir, root),
        "run_dir": str(ref_dir),
        "kind": "reference",
        "finished": True,
        "status": "reference",
        "command": "",
        "method": label,
        "seed": 0,
        **_eval_columns(ref_dir, problems),
    }


def _eval_columns(run_dir: Path, problems: list[str]) -> dict:
    out = {}
    for path in sorted((run_dir / "eval").glob("*.json")):
        result = _read_json(path, problems)
        if not result or "benchmarks" not in result:
            continue
        suite = result.get("suite", path.stem)
        for bench, metrics in result["benchmarks"].items():
            for key in ("avg_at_n", "pass_at_n", "length", "truncation_rate", "problems", "n"):
                if key in metrics:
                    out[f"eval.{suite}.{bench}.{key}"] = metrics[key]
        for key, value in result.get("mean", {}).items():
            out[f"eval.{suite}.mean.{key}"] = value
    return out


def _label_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """`group`: identical config up to the seed. `label`: the method, plus the config keys
    that tell apart groups sharing one method (e.g. `Vanilla (training.lr=3e-05)`)."""
    config_cols = [
        c for c in runs.columns if "." in c and not c.startswith(("summary.", "eval.")) and not c.startswith(NOT_CONFIG)
    ]

    def key_of(row) -> str:
        values = {c: row[c] for c in config_cols if not _is_missing(row[c])}
        blob = json.dumps([row["kind"], row["method"], values], sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    runs = runs.copy()
    runs["group"] = runs.apply(key_of, axis=1)
    labels = {}
    for method, part in runs.groupby("method", sort=False):
        groups = part.drop_duplicates("group")
        varying = [c for c in config_cols if groups[c].astype(str).nunique() > 1 and c not in ("reward.alpha",)]
        for _, g in groups.iterrows():
            extra = ", ".join(f"{c}={g[c]}" for c in varying)
            labels[g["group"]] = f"{method} ({extra})" if extra else method
    runs["label"] = runs["group"].map(labels)
    if "seed" not in runs:
        runs["seed"] = 0
    return runs


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _run_id(path: Path, root: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve())
        return str(rel) if str(rel) != "." else path.name
    except ValueError:
        return str(path)


def _read_json(path: Path, problems: list[str]) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        problems.append(f"{path}:{exc.lineno}: unreadable JSON ({exc.msg})")
        return {}


def _jsonl(path: Path, problems: list[str]):
    with path.open(encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                problems.append(f"{path}:{lineno}: corrupted or partial line (skipped)")
                continue
            if isinstance(record, dict):
                yield lineno, record
            else:
                problems.append(f"{path}:{lineno}: not a JSON object (skipped)")


def curve(curves: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One metric as a wide table: index step, one column per run_id."""
    part = curves[curves["metric"] == metric]
    return part.pivot_table(index="step", columns="run_id", values="value", aggfunc="last")


# ----------------------------------------------------------------------------------------
# W&B (optional): the same frames from a project, through the public API.


def load_wandb(project: str, entity: str | None = None, api=None) -> RunSet:
    """Runs of a W&B project as a RunSet (configs logged by poweropd's tracker). The
    run directories stay the source of truth; this is for runs whose folders are elsewhere."""
    if api is None:
        import wandb

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    rows, curves = [], []
    for wrun in api.runs(path):
        config = flatten({k: v for k, v in dict(wrun.config).items() if not k.startswith("_")})
        summary = {k: v for k, v in dict(wrun.summary).items() if not k.startswith("_")}
        run_id = f"wandb:{wrun.id}"
        rows.append(
            {
                "run_id": run_id,
                "run_dir": "",
                "kind": "run",
                "finished": wrun.state == "finished",
                "status": wrun.state,
                "command": "",
                "method": method_label({k: v for k, v in config.items() if k.startswith("reward.")}),
                **config,
                **{f"summary.{k}": v for k, v in summary.items() if isinstance(v, (int, float, str))},
            }
        )
        for record in wrun.scan_history():
            step = record.get("step", record.get("_step"))
            for key, value in record.items():
                if not key.startswith("_") and key != "step" and isinstance(value, (int, float)):
                    curves.append((run_id, int(step), key, float(value)))
    runs = _label_groups(pd.DataFrame(rows)) if rows else pd.DataFrame(columns=["run_id", "kind", "finished"])
    return RunSet(runs, pd.DataFrame(curves, columns=["run_id", "step", "metric", "value"]), [])
