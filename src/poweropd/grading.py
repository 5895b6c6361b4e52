"""Final-answer extraction and math-equivalence grading for untrusted model output.

Extraction (`extract_answer`)
    The content of the LAST `\\boxed{...}` or `\\fbox{...}` (nested braces, counted the way the MATH and
    Minerva references were derived), or `\\boxed 5` (the token after the space, up to whitespace or `$`).
    A last box whose brace never closes means a truncated answer: None. Without any box, the first line
    after the last `####` (GSM8K style). Otherwise None. Linear time; no regex backtracking, no recursion.

Normalisation (both sides, before any comparison; see `normalize_answer`)
    `$`/`\\$` and `\\!` removed; `\\,` `\\;` `\\:` `\\quad` `~` become spaces; `\\dfrac`/`\\tfrac` -> `\\frac`;
    `\\left`/`\\right`/`\\big..` dropped; `\\text{}` `\\textbf{}` `\\mbox{}` `\\mathrm{}` (and kin) unwrapped;
    degree marks (`^\\circ`, `^{\\circ}`, `\\degree`, `°`) and percent signs (`\\%`, `%`) dropped, so
    `50\\%` == `50` and `10\\%` != `0.1` (the number before the sign is the answer; accepting 0.1 too
    would make 0.1 and 10 interchangeable); trailing unit words from a fixed list of multi-letter units
    (`cm`, `km/h`, `inches^2`, `dollars`, `degrees`, `minutes`, ...), any `\\text{words}` ending an answer
    after a number (`5 \\text{ apples}`), and the row's own `meta['unit']`;
    single-letter "units" are never stripped (`6m` stays 6*m); a trailing period; `x \\in` prefixes;
    numpy names as in Minerva (`np.arcsin` -> `\\arcsin`); thousands separators, only when the whole
    answer is one number with 3-digit groups (`2,125`, `10,\\!080`) and the row is not a list of answers,
    so `(1,2)` and `1, 2` never become 12.

Judgement (`answers_match`, the same rules inside and outside the worker)
    1. Equal normalised strings are equal (whitespace ignored except between two letters or two digits).
    2. Multiple choice: a reference that is a letter A-E (`B`, `(B)`, `\\text{(B)}`) only matches the same
       upper-case letter (`(B) 12` counts as B); a choice letter never equals a number.
    3. Lists: top-level commas (also spaced `and`/`or`) split an answer into elements. Two lists match when
       their elements pair up one-to-one (order ignored, multiplicity kept); lists of different lengths do
       not match, nor, under `meta['is_multiple_answer']`, a list and a single answer. Brackets keep their
       meaning: `(1,2)` is an ordered pair (or open interval), and a bare `1, 2` given for it is read in
       order as `(1, 2)`, so `2, 1` is wrong. With `is_multiple_answer`, outer `\\{...\\}` are dropped.
    4. Assignments: a simple left-hand side (`x`, `f(x)`, `a_{1}`, `\\angle ABC`) is dropped when the other
       side has no `=` (`x = 5` == `5`); a reference equation with any other left side (`SRMC=LRMC`,
       `5x-7y+11z+4=0`) is not matched by a bare value. Two equations match when lhs - rhs agree up to
       a nonzero constant factor (`y = 2x+3` == `2x - y + 3 = 0`); sympy.solve is never used.
    5. A lone letter only equals the same letter (case matters: `A` != `a`; `B` != `5`). Beyond that,
       math-verify (rule 7) lowercases symbol names, so `3R^2` == `3r^2`.
    6. Numbers (integers, decimals, `a/b`, `\\frac{a}{b}`, `\\frac12`, mixed `1\\frac{4}{5}`, scientific
       `4.5e33`, `4.5 \\times 10^{33}`, `4.5\\cdot10^{33}`; leading zeros allowed, so `025` == `25`) compare
       as exact rationals, with a relative tolerance of
         * `MINERVA_REL_TOL` = 1e-2 for Minerva rows (`meta['benchmark']`/`['dataset']` == 'minerva', or an
           `id` starting 'minerva') and whenever the reference is written in scientific notation: those
           references carry 2-4 significant figures computed with rounded physical constants, so a 1%
           relative error is about the precision they state (and 2N+1-sized errors are far outside it);
         * `DECIMAL_REL_TOL` = 1e-5 when either side is written as a decimal (a 6-digit 0.333333 == 1/3,
           while 0.3333 != 1/3 and 3.20 != 3.21);
         * `meta['rel_tol']`, if given, overrides both;
         * otherwise none (integers and fractions must be equal).
       Base-b numerals (`52_8`, `4210_{5}`) match the same digits in the same base, or the digits alone.
    7. Everything else goes to math-verify (LaTeX parsing only, via latex2sympy: model output is never
       `eval`ed, `sympify`ed or fed to `parse_expr`) with its own timeouts off, its unit stripping off and
       its fallback to "any parsable fragment" off. `meta['answer_type']` is accepted but not needed.

Time bound (`Grader`)
    Cheap checks run in the calling process: no extracted answer -> "no_answer"; longer than
    `MAX_ANSWER_CHARS` -> "incorrect"; rules 1-6 decide most answers. The rest goes to one persistent
    worker process (a fresh interpreter, never a fork) running `answers_match`. If it has not answered
    within `timeout_s` (measured from sending the item), or it dies (memory limit `WORKER_MEMORY_BYTES`),
    the worker is killed and reaped, a new one is started, and the grade is "timeout" (correct=False).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

MAX_ANSWER_CHARS = 2000  # longer extracted answers are graded incorrect without parsing
MINERVA_REL_TOL = 1e-2
DECIMAL_REL_TOL = 1e-5
WORKER_MEMORY_BYTES = 4 << 30  # address-space limit of the worker; big-int blowups fail instead of swapping
_MAX_LIST_ELEMENTS_QUICK = 64  # longer lists are paired inside the worker, where time is bounded
_MAX_NUMBER_CHARS = 200
_MAX_EXPONENT = 400

STATUSES = ("correct", "incorrect", "no_answer", "timeout")

# ----------------------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE_RE = re.compile(r"[{}]")
_CHUNK = 4096


def _match_brace(text: str, open_idx: int) -> int | None:
    """Index of the `}` closing the `{` at `open_idx`, or None if it never closes.

    Chunks whose closing braces cannot bring the depth back to zero are skipped with two C-level counts,
    so 10^5 nested braces or megabytes of text cost milliseconds, not a Python loop per character.
    """
    depth, pos, n = 0, open_idx, len(text)
    while pos < n:
        end = min(n, pos + _CHUNK)
        closes = text.count("}", pos, end)
        if closes < depth:
            depth += text.count("{", pos, end) - closes
            pos = end
            continue
        for m in _BRACE_RE.finditer(text, pos, end):
            if m.group() == "{":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return m.start()
        pos = end
    return None


def _last_box(text: str, commands: Sequence[str], allow_bare: bool) -> tuple[bool, str | None]:
    """(found, content) for the last usable box command in `text`; content None when it is unterminated."""
    n = len(text)
    last = {c: text.rfind(c) for c in commands}
    while True:
        cmd = max(last, key=lambda c: last[c])
        pos = last[cmd]
        if pos < 0:
            return False, None
        i = pos + len(cmd)
        j = i
        while j < n and text[j] in " \t\r\n":
            j += 1
        if i < n and text[i].isalpha():
            pass  # another macro, e.g. \boxedanswer
        elif j < n and text[j] == "{":
            close = _match_brace(text, j)
            return True, None if close is None else text[j + 1 : close]
        elif allow_bare and j > i and j < n:
            k = j
            while k < n and text[k] not in " \t\r\n$":
                k += 1
            if k > j:
                return True, text[j:k]
        # Not a usable box: look further left for this command (the others keep their positions).
        last[cmd] = text.rfind(cmd, 0, pos)


def extract_answer(text: str) -> str | None:
    """Final answer of a response: last `\\boxed{}`/`\\fbox{}` (or `\\boxed 5`), else the line after the last `####`.

    None when nothing is found or the last box is unterminated (a truncated answer is not guessed at).
    """
    if not text:
        return None
    found, content = _last_box(text, _BOX_COMMANDS, allow_bare=True)
    if found:
        return None if content is None else content.strip()
    idx = text.rfind("####")
    if idx < 0:
        return None
    start, n = idx + 4, len(text)
    while start < n and text[start] in " \t\r\n":
        start += 1
    end = text.find("\n", start)
    line = text[start : n if end < 0 else end].strip()
    return line or None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (nested braces allowed), else None."""
    found, content = _last_box(text, ("\\boxed",), allow_bare=False)
    return content.strip() if found and content is not None else None


# ----------------------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------------------

_WRAPPER_RE = re.compile(
    r"\\(?:text(?:bf|it|rm|normal|sf|tt|up)?|math(?:rm|bf|it|sf|tt|normal)|mbox|hbox|emph)\s*\{|\\[{}]|[{}]"
)
# `\\\\` (a matrix row break) is matched first so that its second backslash is never read as `\\ `.
_SPACE_CMDS_RE = re.compile(r"\\\\|\\(?:[,;: ]|q?quad(?![A-Za-z]))|~")
_NEG_SPACE_RE = re.compile(r"\\!\s*")
_THIN_THOUSANDS_RE = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")  # 10\,000
_FRAC_RE = re.compile(r"\\[dtc]frac(?![A-Za-z])")
_DELIM_SIZE_RE = re.compile(r"\\(?:left|right)\.|\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])")
_DISPLAY_RE = re.compile(r"\\(?:displaystyle|textstyle|scriptstyle)(?![A-Za-z])")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\degree(?![A-Za-z])|°|\\circ\s*$")
_PERCENT_RE = re.compile(r"\\?%")
_NUMPY_RE = re.compile(r"\bnp\.([A-Za-z]+)")
_IN_PREFIX_RE = re.compile(r"^[A-Za-z]\s*\\in(?![A-Za-z])\s*")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SINGLE_BRACED_RE = re.compile(r"([_^])\{(\w)\}")
_SPACES_RE = re.compile(r"\s+")
_INSIGNIFICANT_SPACE_RE = re.compile(r" (?=[^A-Za-z0-9])|(?<=[^A-Za-z0-9]) |(?<=\d) (?=[A-Za-z])|(?<=[A-Za-z]) (?=\d)")
_TRAILING_PUNCT_RE = re.compile(r"[\s.;,]+$")
_UNICODE_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u00d7": "\\times "})

# Multi-letter unit words only: single letters (m, s, g, h) are too often variables (`6m`, `\frac{1}{m} t`).
_UNIT_WORDS = (
    "km/h km/hr kmh kph mph m/s cm/s ft/s mi/h "
    "millimeters millimetres millimeter millimetre mm centimeters centimetres centimeter centimetre cm "
    "kilometers kilometres kilometer kilometre km meters metres meter metre inches inch feet foot ft "
    "yards yard yd miles mile kilograms kilogram kg grams gram pounds pound lbs lb ounces ounce oz "
    "liters litres liter litre ml gallons gallon "
    "seconds second secs sec minutes minute mins min hours hour hrs hr days day weeks week months month "
    "years year yrs degrees degree deg radians radian rad "
    "dollars dollar cents cent percent units unit sq square cubic"
).split()
_UNIT_WORDS_RE = re.compile(
    r"(?<=[\d}\s)])\s*(?:"
    + "|".join(re.escape(u) for u in sorted(_UNIT_WORDS, key=len, reverse=True))
    + r")(?:\s*\^\s*\{?\s*[23]\s*\}?)?\s*$",
    re.IGNORECASE,
)


# Words in text mode after a number end an answer as its unit, whatever the word: `5 \text{ apples}`.
_TEXT_UNIT_RE = re.compile(
    r"(?<=[\d}])\s*\\(?:text|textrm|mbox)\s*\{\s*[A-Za-z][A-Za-z .]*\}(?:\s*\^\s*\{?\s*[23]\s*\}?)?[\s.$]*$"
)


def _unwrap_text(s: str) -> str:
    """Replace `\\text{...}`-like wrappers by their content in one linear pass (nested braces kept)."""
    if "\\" not in s:
        return s
    out: list[str] = []
    stack: list[bool] = []  # True for a brace opened by a wrapper (dropped when it closes)
    pos = 0
    for m in _WRAPPER_RE.finditer(s):
        out.append(s[pos : m.start()])
        tok = m.group()
        pos = m.end()
        if tok in ("\\{", "\\}"):
            out.append(tok)
        elif tok == "{":
            stack.append(False)
            out.append(tok)
        elif tok == "}":
            if not (stack and stack.pop()):
                out.append(tok)
        else:
            stack.append(True)
    out.append(s[pos:])
    return "".join(out)


def _strip_units(s: str, unit: str | None) -> str:
    if unit:
        u = re.escape(unit)
        t = re.sub(r"\s*" + u + r"\s*$", "", s)
        if t.strip():
            s = t
    for _ in range(3):  # "square feet", "sq units", "km/h" after a number
        t = _UNIT_WORDS_RE.sub("", s)
        if t == s or not t.strip():
            break
        s = t
    return s


def _base_normalize(s: str) -> str:
    """Normalisation shared by answers and unit strings (no unit stripping, no thousands)."""
    s = s.translate(_UNICODE_MINUS).replace("\\$", "").replace("$", "")
    s = s.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    s = _NEG_SPACE_RE.sub("", s)
    s = _THIN_THOUSANDS_RE.sub("", s).replace("{,}", ",")
    s = _SPACE_CMDS_RE.sub(lambda m: m.group() if m.group() == "\\\\" else " ", s)
    s = _FRAC_RE.sub(r"\\frac", s)
    s = _DELIM_SIZE_RE.sub("", s)
    s = _DISPLAY_RE.sub("", s)
    s = _unwrap_text(s)
    s = _DEGREE_RE.sub("", s)
    s = _PERCENT_RE.sub("", s)
    s = _NUMPY_RE.sub(r"\\\1", s)
    return _SPACES_RE.sub(" ", s).strip()


@dataclass(frozen=True)
class _Context:
    multiple: bool = False
    unit: str | None = None
    rel_tol: float | None = None  # explicit tolerance (meta['rel_tol'] or Minerva)


_META_KEYS = ("answer_type", "is_multiple_answer", "unit", "benchmark", "dataset", "rel_tol", "id")


def _clean_meta(meta: dict | None) -> dict[str, Any]:
    """The meta fields the grader reads, as plain values (safe to pickle, cheap to send)."""
    if not meta:
        return {}
    out: dict[str, Any] = {}
    for key in _META_KEYS:
        value = meta.get(key)
        if value is None:
            continue
        if key == "is_multiple_answer":
            out[key] = bool(value)
        elif key == "rel_tol":
            out[key] = float(value)
        else:
            out[key] = str(value)
    return out


@lru_cache(maxsize=256)
def _context(items: tuple[tuple[str, Any], ...]) -> _Context:
    meta = dict(items)
    unit = meta.get("unit")
    unit_norm = _base_normalize(unit) if unit else ""
    names = (str(meta.get("benchmark", "")) + " " + str(meta.get("dataset", ""))).lower()
    minerva = "minerva" in names or str(meta.get("id", "")).lower().startswith("minerva")
    rel_tol = meta.get("rel_tol", MINERVA_REL_TOL if minerva else None)
    return _Context(multiple=bool(meta.get("is_multiple_answer")), unit=unit_norm or None, rel_tol=rel_tol)


def _context_of(meta: dict | None) -> _Context:
    return _context(tuple(sorted(_clean_meta(meta).items())))


@lru_cache(maxsize=4096)
def _normalize(s: str, ctx: _Context, thousands: bool) -> str:
    s = _TEXT_UNIT_RE.sub("", s)
    s = _TRAILING_PUNCT_RE.sub("", _base_normalize(s))  # `5 cm.`: the period first, then the unit
    s = _TRAILING_PUNCT_RE.sub("", _strip_units(s, ctx.unit))
    s = _IN_PREFIX_RE.sub("", s)
    if thousands and _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    s = _SINGLE_BRACED_RE.sub(r"\1\2", s)
    return s.strip()


def _key(s: str) -> str:
    """Comparison key: whitespace kept only between two letters or two digits (`\\cot x`, `2 3`)."""
    return _INSIGNIFICANT_SPACE_RE.sub("", s)


def _thousands_allowed(ref: str, ctx: _Context) -> bool:
    """Thousands separators are stripped unless the reference is a list of answers (then `100,200` is two)."""
    if ctx.multiple:
        return False
    first = _normalize(ref, ctx, thousands=False)
    return bool(_THOUSANDS_RE.fullmatch(first)) or len(_split_top(first)) < 2


def normalize_answer(answer: str, meta: dict | None = None) -> str:
    """The normalised form of a reference answer, as the grader compares it (see the module docstring)."""
    ctx = _context_of(meta)
    return _normalize(answer, ctx, thousands=_thousands_allowed(answer, ctx))


# ----------------------------------------------------------------------------------------------------------------------
# Structure: lists, assignments, letters, numbers
# ----------------------------------------------------------------------------------------------------------------------

_OPEN = "([{"
_CLOSE = ")]}"
_AND_OR_RE = re.compile(r"\s+(?:and|or)\s+")


def _split_top(s: str) -> list[str]:
    """Split on commas/semicolons (and spaced `and`/`or`) outside any bracket; empty parts dropped."""
    s = _AND_OR_RE.sub(",", s)
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(s):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(0, depth - 1)
        elif ch in ",;" and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p.strip() for p in parts if p.strip()]


def _strip_outer_set(s: str) -> str:
    """`\\{1, 2\\}` -> `1, 2` when the set braces enclose the whole answer."""
    if s.startswith("\\{") and s.endswith("\\}"):
        depth = 0
        for i in range(len(s)):
            if s.startswith("\\{", i):
                depth += 1
            elif s.startswith("\\}", i):
                depth -= 1
                if depth == 0 and i != len(s) - 2:
                    return s
        return s[2:-2].strip()
    return s


_EQ_SPLIT_RE = re.compile(r"(?<![<>!\\])=|\\approx(?![A-Za-z])")
# One letter or Greek command, primes, a subscript, arguments: `x`, `a_{1}`, `f(x)`, `\\theta'`. Not `SRMC`.
_SIMPLE_LHS_RE = re.compile(
    r"(?:[A-Za-z]|\\[A-Za-z]+)'*(?:_(?:\{[^{}]*\}|[A-Za-z0-9]))?(?:\([^()]*\))?"
    r"|\\angle ?[A-Z](?: ?[A-Z])*(?:_(?:\{[^{}]*\}|[A-Za-z0-9]))?"
)


def _rhs_of_assignment(s: str) -> str | None:
    """`x = 5` -> `5`; `f(x) = 2x` -> `2x`; `x = 2+3 = 5` -> `5`. None when `s` is not a simple assignment."""
    parts = _EQ_SPLIT_RE.split(s)
    if len(parts) < 2 or not _SIMPLE_LHS_RE.fullmatch(_key(parts[0].strip())):
        return None
    rhs = parts[-1].strip()
    return rhs or None


_REF_CHOICE_RE = re.compile(r"\(?([A-E])\)?")
_PRED_CHOICE_RE = re.compile(r"\(([A-Z])\).*|([A-Z])(?:[.):](?:\s.*)?)?", re.DOTALL)
_LETTER_RE = re.compile(r"[A-Za-z]")
_BASE_NUMBER_RE = re.compile(r"(?P<digits>[0-9A-Za-z]+)_(?:\{(?P<base>\d+)\}|(?P<base1>\d))")
_WORDS_RE = re.compile(r"[A-Za-z]{2,}(?: [A-Za-z]+)*")

_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_SCI_RE = re.compile(
    r"(?P<sign>[+-]?)(?P<m>" + _NUM + r")"
    r"(?:[eE](?P<e1>[+-]?\d+)|(?:\\times|\\cdot|\*)10\^(?:\{(?P<e2>[+-]?\d+)\}|(?P<e3>\d)))?"
)
_POW10_RE = re.compile(r"(?P<sign>[+-]?)10\^(?:\{(?P<e1>[+-]?\d+)\}|(?P<e2>\d))")
_FRAC_NUM_RE = re.compile(
    r"(?P<sign>[+-]?)\\frac(?:\{(?P<a>[+-]?" + _NUM + r")\}|(?P<a1>\d))(?:\{(?P<b>[+-]?" + _NUM + r")\}|(?P<b1>\d))"
)
_SLASH_RE = re.compile(r"(?P<a>[+-]?" + _NUM + r")/(?P<b>[+-]?" + _NUM + r")")
_MIXED_RE = re.compile(r"(?P<sign>[+-]?)(?P<w>\d+)\\frac(?:\{(?P<a>\d+)\}|(?P<a1>\d))(?:\{(?P<b>\d+)\}|(?P<b1>\d))")


@dataclass(frozen=True)
class _Number:
    value: Fraction
    decimal: bool  # written with a decimal point or an exponent
    sci: bool  # written in scientific notation


def _pow10(exp: str) -> Fraction | None:
    e = int(exp)
    return None if abs(e) > _MAX_EXPONENT else Fraction(10) ** e


def _parse_number(key: str) -> _Number | None:
    """A plain real number written in one of the forms of rule 6, exactly; None for anything else."""
    if not key or len(key) > _MAX_NUMBER_CHARS:
        return None
    m = _SCI_RE.fullmatch(key)
    if m:
        value = Fraction(m["m"])
        exp = m["e1"] or m["e2"] or m["e3"]
        if exp is not None:
            scale = _pow10(exp)
            if scale is None:
                return None
            value *= scale
        value = -value if m["sign"] == "-" else value
        return _Number(value, decimal="." in m["m"] or exp is not None, sci=exp is not None)
    m = _POW10_RE.fullmatch(key)
    if m:
        scale = _pow10(m["e1"] or m["e2"])
        if scale is None:
            return None
        # A bare power of ten is exact (`10^{3}` is 1000), unlike a mantissa with an exponent.
        return _Number(-scale if m["sign"] == "-" else scale, decimal=False, sci=False)
    m = _FRAC_NUM_RE.fullmatch(key) or _SLASH_RE.fullmatch(key)
    if m:
        groups = m.groupdict()
        a, b = groups.get("a") or groups.get("a1"), groups.get("b") or groups.get("b1")
        num, den = Fraction(a), Fraction(b)
        if den == 0:
            return None
        value = num / den
        value = -value if groups.get("sign") == "-" else value
        return _Number(value, decimal="." in a + b, sci=False)
    m = _MIXED_RE.fullmatch(key)
    if m:
        num, den = int(m["a"] or m["a1"]), int(m["b"] or m["b1"])
        if den == 0 or num >= den:
            return None  # `2\frac{5}{3}` is not a mixed number; let math-verify read it as a product
        value = int(m["w"]) + Fraction(num, den)
        return _Number(-value if m["sign"] == "-" else value, decimal=False, sci=False)
    return None


def _numbers_equal(p: _Number, r: _Number, ctx: _Context) -> bool:
    if p.value == r.value:
        return True
    if ctx.rel_tol is not None:
        tol = ctx.rel_tol
    elif r.sci:
        tol = MINERVA_REL_TOL
    elif p.decimal or r.decimal:
        tol = DECIMAL_REL_TOL
    else:
        return False
    return abs(p.value - r.value) <= Fraction(tol) * abs(r.value)


# ----------------------------------------------------------------------------------------------------------------------
# Judgement
# ----------------------------------------------------------------------------------------------------------------------

Verdict = bool | None  # None: the cheap rules cannot decide


def _quick_single(p: str, r: str, ctx: _Context) -> Verdict:
    """Rules 1 and 4-6 for one element; None when math-verify is needed."""
    pk, rk = _key(p), _key(r)
    if not pk:
        return False
    if pk == rk:
        return True
    p_has_eq, r_has_eq = bool(_EQ_SPLIT_RE.search(p)), bool(_EQ_SPLIT_RE.search(r))
    if p_has_eq and not r_has_eq:
        rhs = _rhs_of_assignment(p)
        if rhs is not None:
            p, pk = rhs, _key(rhs)
    elif r_has_eq and not p_has_eq:
        rhs = _rhs_of_assignment(r)
        if rhs is None:
            return False  # the reference is an equation (`SRMC=LRMC`, a plane): a bare value does not state it
        r, rk = rhs, _key(rhs)
    elif p_has_eq and r_has_eq:
        p_rhs, r_rhs = _rhs_of_assignment(p), _rhs_of_assignment(r)
        if p_rhs is not None and r_rhs is not None and _key(p.split("=")[0]) == _key(r.split("=")[0]):
            p, pk, r, rk = p_rhs, _key(p_rhs), r_rhs, _key(r_rhs)
    if pk == rk:
        return True
    ref_base = _base_number(rk)
    if ref_base is not None:
        # `52_8`: the same digits, in the same base or with the base left out; math-verify drops subscripts.
        pred_base = _base_number(pk)
        return pred_base == ref_base if pred_base is not None else pk.upper().lstrip("0") == ref_base[0]
    if _LETTER_RE.fullmatch(pk) or _LETTER_RE.fullmatch(rk):
        return False  # a lone letter only equals itself (A is not a, B is not 5)
    if _WORDS_RE.fullmatch(pk) and _WORDS_RE.fullmatch(rk) and pk.casefold() == rk.casefold():
        return True
    pn, rn = _parse_number(pk), _parse_number(rk)
    if pn is not None and rn is not None:
        return _numbers_equal(pn, rn, ctx)
    return None


def _base_number(key: str) -> tuple[str, int] | None:
    """(digits, base) for a base-b numeral such as `52_8` or `4210_{5}` (digits valid in the base), else None."""
    m = _BASE_NUMBER_RE.fullmatch(key)
    if not m:
        return None
    digits, base = m["digits"].upper(), int(m["base"] or m["base1"])
    if not 2 <= base <= 36 or not any(c.isdigit() for c in digits):
        return None
    if any(int(c, 36) >= base for c in digits):
        return None
    return digits.lstrip("0") or "0", base


def _ref_choice(rk: str) -> str | None:
    m = _REF_CHOICE_RE.fullmatch(rk)
    return m.group(1) if m else None


def _pred_choice(pred: str) -> str | None:
    m = _PRED_CHOICE_RE.fullmatch(pred.strip())
    return (m.group(1) or m.group(2)) if m else None


def _pair_up(n: int, edge: Callable[[int, int], Verdict]) -> Verdict:
    """Whether n predicted and n reference elements pair up one-to-one (multiset equality under `edge`).

    Edges are evaluated lazily, same position first, so lists in the same order cost n comparisons.
    True if a perfect pairing exists on True edges; False if none exists even counting unknown edges
    as True; else None.
    """
    cache: dict[tuple[int, int], Verdict] = {}

    def get(i: int, j: int) -> Verdict:
        if (i, j) not in cache:
            cache[(i, j)] = edge(i, j)
        return cache[(i, j)]

    def perfect(accept: Callable[[Verdict], bool]) -> bool:
        match_of_ref: list[int] = [-1] * n

        def augment(i: int, seen: list[bool]) -> bool:
            for step in range(n):
                j = (i + step) % n
                if seen[j] or not accept(get(i, j)):
                    continue
                seen[j] = True
                if match_of_ref[j] < 0 or augment(match_of_ref[j], seen):
                    match_of_ref[j] = i
                    return True
            return False

        return all(augment(i, [False] * n) for i in range(n))

    # Kuhn's augmenting paths find a maximum matching, so a failure here means no perfect pairing exists.
    if perfect(lambda v: v is True):
        return True
    return None if perfect(lambda v: v is not False) else False


def _prepare(pred: str, ref: str, ctx: _Context) -> tuple[str, str]:
    thousands = _thousands_allowed(ref, ctx)
    r = _normalize(ref, ctx, thousands=thousands)
    p = _normalize(pred, ctx, thousands=thousands)
    if ctx.multiple:
        p, r = _strip_outer_set(p), _strip_outer_set(r)
    return p, r


def _judge(pred: str, ref: str, meta: dict | None, single: Callable[[str, str, _Context], Verdict]) -> Verdict:
    if not pred or not pred.strip() or len(pred) > MAX_ANSWER_CHARS:
        return False
    ctx = _context_of(meta)
    p, r = _prepare(pred, ref, ctx)
    pk, rk = _key(p), _key(r)
    if not pk:
        return False
    if pk == rk:
        return True
    letter = _ref_choice(rk)
    if letter is not None:
        return _pred_choice(p) == letter
    if _pred_choice(p) is not None and _LETTER_RE.search(pk) and not _LETTER_RE.search(rk):
        return False  # a choice letter is never a number
    p_parts, r_parts = _split_top(p), _split_top(r)
    if len(p_parts) > 1 and len(r_parts) == 1 and _is_round_tuple(r, len(p_parts)):
        # `1, 2` for the pair `(1,2)`: read it as `(1, 2)`, in order (math-verify would sort it as a set).
        p, p_parts = "(" + p + ")", ["(" + p + ")"]
    if len(p_parts) > 1 and len(r_parts) > 1:
        if len(p_parts) != len(r_parts):
            return False
        if single is _quick_single and len(p_parts) > _MAX_LIST_ELEMENTS_QUICK:
            return None
        return _pair_up(len(p_parts), lambda i, j: single(p_parts[i], r_parts[j], ctx))
    if ctx.multiple and (len(p_parts) > 1 or len(r_parts) > 1):
        return False  # a different number of answers
    return single(p, r, ctx)


def _is_round_tuple(s: str, n: int) -> bool:
    """Whether `s` is one `( ... )` holding `n` top-level elements."""
    if not (s.startswith("(") and s.endswith(")")):
        return False
    depth = 0
    for i, ch in enumerate(s):
        depth += ch in _OPEN
        depth -= ch in _CLOSE
        if depth == 0 and i != len(s) - 1:
            return False
    return len(_split_top(s[1:-1])) == n


def _quick_match(pred: str, ref: str, meta: dict | None = None) -> Verdict:
    """The cheap rules only: True/False when they decide, None when math-verify is needed."""
    return _judge(pred, ref, meta, _quick_single)


# -- math-verify (only ever called on normalised strings of bounded length, inside the worker in practice) --


@lru_cache(maxsize=1)
def _mv_config() -> list:
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    # units=False: math-verify's own unit list strips single letters (`6m` -> 6), a false-positive source.
    norm = NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all")
    # try_extract_without_anchor=False: when the boxed text does not parse, math-verify would otherwise fall
    # back to any fragment it can parse (`\frac{1}{3} E_{1}+\frac{2}{3} E_{2}` became 2/3), a false-positive source.
    return [LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=0, normalization_config=norm)]


@lru_cache(maxsize=2048)
def _mv_parse(s: str) -> tuple:
    import math_verify

    # Only the LaTeX extractor: ExprExtractionConfig would run sympy's parse_expr (eval) on the text.
    return tuple(math_verify.parse("\\boxed{" + s + "}", extraction_config=_mv_config(), parsing_timeout=None))


def _approx_equal_sympy(gold: Any, pred: Any, tol: float) -> bool:
    import sympy

    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return False
    if not (gold.is_number and pred.is_number):
        return False
    g, p = complex(sympy.N(gold, 30)), complex(sympy.N(pred, 30))
    return abs(p - g) <= tol * abs(g)


def _is_equation(expr: Any) -> bool:
    import sympy

    return isinstance(expr, sympy.Equality)


def _equations_proportional(gold: Any, pred: Any) -> bool:
    """Equations are equal when lhs - rhs agree up to a nonzero constant factor (`y = 2x` == `2x - y = 0`)."""
    import sympy

    g, p = gold.lhs - gold.rhs, pred.lhs - pred.rhs
    if sympy.simplify(p) == 0:
        return sympy.simplify(g) == 0
    ratio = sympy.simplify(g / p)
    return not ratio.free_symbols and ratio.is_zero is False and ratio.is_finite is True


def _deep_single(p: str, r: str, ctx: _Context) -> bool:
    quick = _quick_single(p, r, ctx)
    if quick is not None:
        return quick
    import math_verify

    gold, target = _mv_parse(r), _mv_parse(p)
    if not gold or not target:
        return False
    if _is_equation(gold[0]) and _is_equation(target[0]):
        # math-verify would fall back to sympy.solve over every symbol (seconds on Minerva's ODEs).
        return _equations_proportional(gold[0], target[0])
    if math_verify.verify(list(gold), list(target), strict=True, timeout_seconds=None):
        return True
    rn = _parse_number(_key(r))
    tol = ctx.rel_tol if ctx.rel_tol is not None else (MINERVA_REL_TOL if rn is not None and rn.sci else None)
    if tol is not None:
        try:
            return _approx_equal_sympy(gold[0], target[0], tol)
        except Exception:
            return False
    return False


def answers_match(pred: str, ref: str, meta: dict | None = None) -> bool:
    """Whether answer `pred` equals reference `ref` under the module's rules (no time bound of its own).

    `meta` may carry the benchmark row's fields: 'is_multiple_answer', 'unit', 'answer_type' (OlympiadBench),
    'benchmark'/'dataset'/'id' (Minerva tolerance), 'rel_tol' (explicit numeric tolerance).
    """
    try:
        return bool(_judge(pred, ref, meta, _deep_single))
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------------------------------
# Grader: cheap checks here, math-verify in a killable worker process
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grade:
    """One graded response: the extracted answer (None if none), the verdict, and how it was reached."""

    extracted: str | None
    correct: bool
    status: str  # one of STATUSES


_SRC_DIR = str(Path(__file__).resolve().parents[1])
_WORKER_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); from poweropd.grading import _worker_main; _worker_main(sys.argv[2:])"
)


def _worker_main(argv: list[str]) -> None:
    """Worker loop: (pred, ref, meta) in, bool out, over two inherited pipes; exits on None or EOF."""
    req_fd, res_fd, fuse_s = int(argv[0]), int(argv[1]), int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent, which then closes us
    with contextlib.suppress(Exception):
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    answers_match("x+1", "1+x")  # warm up: imports sympy, builds the ANTLR parser
    requests, results = Connection(req_fd, writable=False), Connection(res_fd, readable=False)
    results.send("ready")
    while True:
        try:
            msg = requests.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        # Fuse: SIGALRM's default action ends the process even inside C code, should the parent be gone.
        signal.alarm(fuse_s)
        verdict = answers_match(*msg)
        signal.alarm(0)
        try:
            results.send(verdict)
        except OSError:
            break


class _Worker:
    """One worker process and its two pipes."""

    def __init__(self, fuse_s: int) -> None:
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, _SRC_DIR, str(req_r), str(res_w), str(fuse_s)],
                pass_fds=(req_r, res_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in (req_r, req_w, res_r, res_w):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(res_w)
        self.requests = Connection(req_w, readable=False)
        self.results = Connection(res_r, writable=False)
        self.ready = False
        self.owner_pid = os.getpid()  # a forked copy of the Grader must not stop its parent's worker

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        try:
            if self.results.poll(timeout_s) and self.results.recv() == "ready":
                self.ready = True
                return
        except (EOFError, OSError):
            pass
        self.kill()
        raise RuntimeError("grading worker failed to start (is math-verify installed?)")

    def ask(self, msg: tuple, timeout_s: float) -> bool | None:
        """The worker's verdict, or None if it took longer than `timeout_s` or died."""
        try:
            self.requests.send(msg)
            if self.results.poll(timeout_s):
                return bool(self.results.recv())
        except (EOFError, OSError):
            pass
        return None

    def kill(self) -> None:
        if os.getpid() == self.owner_pid:
            with contextlib.suppress(OSError):
                self.proc.kill()
            self.proc.wait()
        self._close_pipes()

    def stop(self) -> None:
        if os.getpid() != self.owner_pid:
            self._close_pipes()
            return
        with contextlib.suppress(OSError):
            self.requests.send(None)
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for conn in (self.requests, self.results):
            with contextlib.suppress(OSError):
                conn.close()


class Grader:
    """Grades responses against references with a hard per-answer time bound (see the module docstring).

    The worker is a fresh interpreter started with `subprocess` (fork+exec, as multiprocessing's "spawn"
    does), not a fork of the caller, so a threaded (torch) parent is safe, and unlike multiprocessing it
    does not re-import the caller's `__main__`. It starts on first need; `close()` (or `with`) ends it.
    Thread-safe (one lock around the worker).
    """

    def __init__(self, timeout_s: float = 5.0) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = 120.0
        self._worker: _Worker | None = None
        self._lock = threading.Lock()
        self.worker_calls = 0
        self.timeouts = 0

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def grade(self, response: str, reference: str, meta: dict | None = None) -> Grade:
        extracted = extract_answer(response or "")
        if extracted is None or not extracted.strip():
            return Grade(extracted, False, "no_answer")
        if len(extracted) > MAX_ANSWER_CHARS:
            return Grade(extracted, False, "incorrect")
        clean = _clean_meta(meta)
        try:
            verdict = _quick_match(extracted, reference, clean)
        except Exception:
            verdict = None
        if verdict is None:
            verdict = self._ask_worker((extracted, reference, clean))
            if verdict is None:
                return Grade(extracted, False, "timeout")
        return Grade(extracted, verdict, "correct" if verdict else "incorrect")

    def grade_many(self, items: Iterable[tuple[str, str, dict | None]]) -> list[Grade]:
        return [self.grade(response, reference, meta) for response, reference, meta in items]

    def close(self) -> None:
        """Stop the worker (a later `grade` starts a new one)."""
        with self._lock:
            if self._worker is not None:
                self._worker.stop()
                self._worker = None

    def _ask_worker(self, msg: tuple) -> bool | None:
        with self._lock:
            if self._worker is None:
                self._worker = _Worker(self._fuse_s())
            self._worker.wait_ready(self.startup_timeout_s)
            self.worker_calls += 1
            verdict = self._worker.ask(msg, self.timeout_s)
            if verdict is None:
                self.timeouts += 1
                self._worker.kill()
                # Start the replacement now: it boots while the caller carries on.
                self._worker = _Worker(self._fuse_s())
            return verdict

    def _fuse_s(self) -> int:
        return int(self.timeout_s * 4) + 30
