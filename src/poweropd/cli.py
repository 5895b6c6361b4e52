"""The command-line pre-check of run.py and evaluate.py: one clear line for a typo or a bad
value, before Hydra prints its own errors and before any job starts or any directory is made.

    check_overrides   each `key=value` against the schema (poweropd.config) and conf/ groups:
                      unknown keys (with the closest valid one), unknown group options, types
    check_every_job   the composed, validated config of every job of a (multi)run
    hydra_only_command  shell completion, --help, --info: no job runs, nothing is checked
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

from poweropd.config import Config, register_configs, schema_fields, to_config
from poweropd.errors import ConfigError
from poweropd.tracking import HYDRA_OWN, LOCK

GROUPS = ("model_pair", "reward", "method", "training", "logger", "experiment")
EVAL_GROUPS = ("model_pair", "eval")


def group_options(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))


def _resolve_key(key: str, root: Any = None):
    """Walk `a.b.c` through the schema; return the Field or raise ConfigError."""
    node: Any = root or Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = schema_fields(node)
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f" (did you mean '{'.'.join(parts[:depth] + close)}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{key}'{hint}; valid keys under {where}: {', '.join(sorted(fields))}"
            )
        found = fields[part]
        hints = typing.get_type_hints(node)
        node = hints[part]
        if depth < len(parts) - 1 and not dataclasses.is_dataclass(node):
            raise ConfigError(f"config key '{'.'.join(parts[: depth + 1])}' has no sub-keys (got '{key}')")
    return found, node


def _check_type(key: str, value: Any, hint: Any) -> None:
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[x]
        if value is None:
            return
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if isinstance(value, str) and "${" in value:
        return  # interpolation: checked after composition
    expected = {float: (int, float), int: (int,), bool: (bool,), str: (str, int, float, bool)}.get(hint)
    if origin is list:
        expected = (list,)
    if expected is None or dataclasses.is_dataclass(hint):
        return
    if isinstance(value, bool) and hint in (int, float):
        expected = ()
    if not isinstance(value, expected):
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {name}")


def check_overrides(overrides: list[str], conf_dir: Path, root: Any = None, groups: tuple = GROUPS) -> None:
    """Check command-line overrides against the schema (`root`, default the training
    Config) and its conf/ groups. Raises ConfigError. Sweep functions are understood:
    choice() and range() are checked value by value, glob() against the group's options,
    interval() (an optimizer's continuous range) by its bounds."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob, IntervalSweep
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from None
    chosen = {o.key_or_group: o.input_line for o in parsed if not o.is_delete()}
    if "method" in chosen and "reward" in chosen:
        # Hydra would let reward= win over the method file's own choice of reward and keep the
        # method's knobs: a run that is neither. Knob overrides (reward.alpha=...) are fine.
        raise ConfigError(
            f"{chosen['method']} already chooses the objective (conf/method/), so {chosen['reward']} would "
            "silently replace it; give one of the two (knobs such as reward.alpha=... may go with either)"
        )
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra") or override.is_delete():
            continue
        raw = override.value()
        options = group_options(conf_dir, key) if key in groups else None
        if isinstance(raw, Glob):
            values = raw.filter(options) if options is not None else []
            if options is not None and not values:
                raise ConfigError(
                    f"{key}={override.input_line.split('=', 1)[1]} matches no option; valid: {', '.join(options)}"
                )
        elif isinstance(raw, IntervalSweep):
            values = [raw.start, raw.end]
        elif override.is_sweep_override():
            values = list(override.sweep_iterator())
        else:
            values = [raw]
        if options is not None:
            for value in values:
                if value is not None and str(value) not in options:
                    raise ConfigError(f"unknown {key} '{value}'; valid: {', '.join(options)}")
            continue
        _, hint = _resolve_key(key, root)
        for value in values:
            _check_type(key, value, hint)


def check_every_job(argv: list[str], conf_dir: Path, schema: type = None) -> int:
    """Compose and validate the config of every job a command line would run (one, or every
    combination of a multirun, the sweep file's own params included), before any job starts
    or any directory is made. Returns the number of jobs; raises ConfigError naming the first
    bad job. Sweeps an enumerating sweeper cannot expand (interval()) are left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path, get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = schema or Config
    register_configs()
    args, _ = get_args_parser().parse_known_args(argv)
    config_dir = Path(args.config_dir).resolve() if args.config_dir else Path(conf_dir)
    config_name = args.config_name or ("evaluate" if schema is not Config else "config")
    overrides = list(args.overrides or [])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            base = compose(
                config_name=config_name, overrides=[o for o in overrides if not _is_sweep(o)], return_hydra_config=True
            )
            multirun = (
                args.multirun
                or OmegaConf.select(base, "hydra.mode", default=None) is not None
                and str(OmegaConf.select(base, "hydra.mode")).endswith("MULTIRUN")
            )
            found = OmegaConf.select(base, "hydra.sweeper.params", default=None) if multirun else None
            params = OmegaConf.to_container(found) if found is not None else {}
            lines = [f"{k}={v}" for k, v in params.items()] + overrides
            loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir)))
            parsed = OverridesParser.create(config_loader=loader).parse_overrides(lines)
            if any(_is_interval(o) for o in parsed):
                return 0
            jobs = (
                [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
                if multirun
                else [overrides]
            )
            for number, job in enumerate(jobs):
                try:
                    to_config(compose(config_name=config_name, overrides=job), schema)
                except ConfigError as exc:
                    where = f"job {number} ({' '.join(job)}): " if multirun else ""
                    raise ConfigError(f"{where}{exc}" + (" (no job was started)" if multirun else "")) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from None
    finally:
        GlobalHydra.instance().clear()
    return len(jobs)


HYDRA_ONLY_FLAGS = ("-sc", "--shell-completion", "-h", "--help", "-i", "--info", "--hydra-help")


def hydra_only_command(argv: list[str]) -> bool:
    """Commands Hydra answers itself (shell completion and its query, help, info): no job runs,
    so nothing is pre-checked (a half-typed override must still complete)."""
    return any(a in HYDRA_ONLY_FLAGS or a.startswith(("--shell-completion=", "--info=")) for a in argv)


def remove_refused_run_dir(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but what a launch writes before the run's
    own files (Hydra's files, the run lock), never one with a run's files in it (e.g. a
    resumed run refused for a changed config), and never one whose lock another process
    holds. The lock is held while the directory goes, so no run can start in it meanwhile."""
    import shutil

    from poweropd.files import try_lock

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= HYDRA_OWN:
        return
    lock = run_dir / LOCK
    if not lock.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    with open(lock, "a") as handle:
        try:
            if not try_lock(handle):  # held by a run that is starting there: not ours to remove
                return
        except OSError:  # a filesystem without locks: leave the directory alone
            return
        if {p.name for p in run_dir.iterdir()} <= HYDRA_OWN:
            shutil.rmtree(run_dir, ignore_errors=True)


def _is_sweep(line: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(line).is_sweep_override()


def _is_interval(override) -> bool:
    from hydra.core.override_parser.types import IntervalSweep

    return isinstance(override.value(), IntervalSweep)


def cli_overrides(argv: list[str]) -> list[str]:
    """The `key=value` overrides of a Hydra command line (flags and their values removed)."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    return list(args.overrides or [])
