"""The one read path and the one write path of every file the harness writes and reads back.

Reading: configs, summaries, evaluation results and samples, training / benchmark data,
trainer states. A missing, truncated, garbage or wrongly encoded file becomes a FileProblem:
one line naming the file (and line) and what to do, never a JSONDecodeError or
UnicodeDecodeError traceback.

Writing: through a uniquely named temporary in the same folder, renamed into place, so a
kill or a full disk leaves the old file or the new one, never half of one; a full disk is a
DiskFull error saying which write failed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from poweropd.errors import ConfigError


class FileProblem(ConfigError):
    """A file the harness reads back is missing, corrupt or not UTF-8 (one line)."""


class DiskFull(ConfigError):
    """A write failed for lack of space (one line naming the file)."""


def read_json(path: str | os.PathLike, fix: str = "restore or delete it") -> object:
    """The JSON document in `path`, or FileProblem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileProblem(f"{path} does not exist; {fix}") from None
    except OSError as exc:
        raise FileProblem(f"cannot read {path} ({exc.strerror or exc}); {fix}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FileProblem(f"{path} is not UTF-8 text (byte {exc.start}); {fix}") from None
    except json.JSONDecodeError as exc:
        what = (
            "is empty" if not data.strip() else f"is not valid JSON ({exc.msg.removesuffix(' at')}, line {exc.lineno})"
        )
        raise FileProblem(f"{path} {what}; {fix}") from None


def read_json_object(path: str | os.PathLike, fix: str = "restore or delete it") -> dict:
    obj = read_json(path, fix)
    if not isinstance(obj, dict):
        raise FileProblem(f"{path} holds a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


def jsonl_lines(path: str | os.PathLike, fix: str = "fix or remove that line") -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line; a line that is not UTF-8 is a FileProblem
    naming it (the file is read as bytes, so one bad byte cannot hide the line it is on)."""
    path = Path(path)
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FileProblem(f"{path}:{lineno}: not UTF-8 text (byte {exc.start} of the line); {fix}") from None
            if line.strip():
                yield lineno, line


def read_jsonl_lenient(path: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """All parseable lines of a JSONL file, and the numbers of the lines that were not
    (a run killed mid-write leaves at most one partial last line; a line that is not
    UTF-8 counts as unparseable)."""
    rows, bad = [], []
    path = Path(path)
    if not path.exists():
        return rows, bad
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                rows.append(json.loads(raw.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad.append(lineno)
    return rows, bad


def unreadable_lines(path: str | os.PathLike, numbers: list[int]) -> list[str]:
    """The raw text of the given lines (undecodable bytes replaced), to keep them aside."""
    wanted, out = set(numbers), []
    with Path(path).open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if lineno in wanted:
                out.append(raw.decode("utf-8", errors="replace").rstrip("\n"))
    return out


def try_lock(handle) -> bool:
    """Take an exclusive flock on an open file without waiting: False when another process
    holds it (other OSErrors, e.g. a filesystem without locks, propagate)."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, or torch's zip writer failing mid-file (what a full disk looks like there)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, RuntimeError) and "unexpected pos" in str(exc)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file of a unique name in the same folder,
    so that two processes writing the same file never trip over each other's temporary."""
    path = Path(path)
    tmp = None
    try:
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if is_disk_full(exc):
            raise DiskFull(f"writing {path} failed: no space left on device; free space and run again") from None
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable))


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
