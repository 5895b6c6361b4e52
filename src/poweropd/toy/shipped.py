"""The toy pair that ships with the package (torch-free).

Floating-point rounding differs between CPUs, so a pair built from its spec is not the same
pair on every machine (another SFT stopping step, other accuracies). The default pair is
therefore not built on first use: `pair/` beside this file holds the pair the committed toy
study was run on (teacher, student, their tokenizer, build.json), and `pair/SHA256SUMS`
(the `sha256sum` format, so `sha256sum -c` reads it too) pins every file of it.

A run whose `model_pair.toy` spec hashes to the shipped pair's key uses it in place; any
other spec, or `model_pair.use_shipped_pair=false`, builds into the cache
(`poweropd.toy.build`). `python -m poweropd.toy.build build --ship` rebuilds the default
pair and writes it here, manifest included (for maintainers).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from poweropd.errors import ConfigError
from poweropd.toy.spec import ToyPairSpec, cache_key

SHIPPED_DIR = Path(__file__).resolve().with_name("pair")
MANIFEST = "SHA256SUMS"


def shipped_key(root: Path = SHIPPED_DIR) -> str | None:
    """The cache key of the shipped pair, or None when the package holds none."""
    try:
        return json.loads((root / "build.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pair_files(root: Path) -> list[str]:
    """Every file of a pair folder, as sorted relative paths (the manifest itself left out)."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST and "__" not in p.name
    )


def read_manifest(root: Path) -> dict[str, str]:
    manifest: dict[str, str] = {}
    for line in (root / MANIFEST).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            manifest[name.lstrip("*")] = digest
    return manifest


def check_manifest(root: Path = SHIPPED_DIR) -> list[str]:
    """What differs between the pair folder and its manifest (empty: intact)."""
    try:
        manifest = read_manifest(root)
    except (OSError, ValueError) as exc:
        return [f"{MANIFEST} unreadable ({exc.__class__.__name__})"]
    problems = []
    for name, digest in manifest.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif sha256_of(path) != digest:
            problems.append(f"{name} has another sha256")
    problems += [f"{name} not in {MANIFEST}" for name in pair_files(root) if name not in manifest]
    return problems


def shipped_pair(spec: ToyPairSpec, root: Path = SHIPPED_DIR) -> Path | None:
    """The shipped pair's folder when `spec` is the spec it was built from, else None.
    Refuses, in one line, a shipped pair whose files no longer match the manifest."""
    key = shipped_key(root)
    if key is None or key != cache_key(spec):
        return None
    problems = check_manifest(root)
    if problems:
        raise ConfigError(
            f"the shipped toy pair in {root} is damaged ({'; '.join(problems[:3])}); reinstall the package, "
            "or run with model_pair.use_shipped_pair=false to build the pair into the cache instead"
        )
    return root


def write_manifest(root: Path) -> None:
    lines = [f"{sha256_of(root / name)}  {name}" for name in pair_files(root)]
    (root / MANIFEST).write_text("\n".join(lines) + "\n")


def ship(built: Path, root: Path = SHIPPED_DIR) -> Path:
    """Copy a built pair folder (teacher/, student/, build.json) into the package, with its manifest."""
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("teacher", "student"):
        shutil.copytree(built / name, tmp / name)
    shutil.copy2(built / "build.json", tmp / "build.json")
    write_manifest(tmp)
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root
