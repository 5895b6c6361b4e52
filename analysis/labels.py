"""How methods are ordered and read back from their labels in every table and legend.

Labels are made by poweropd.objectives.method_label ("Vanilla", "+ Clip", "PowerOPD α=500",
"JSD β=0.5", ...); this module only reads them, so it needs neither torch nor the registry
(the Fig 5 heatmap command runs without torch).
"""

from __future__ import annotations

import math
import re

# Table and legend order: the reference models, then the paper's rows (Tables 2/3).
BASELINE_ORDER = ("Teacher", "Student", "Full-vocab", "Vanilla", "+ Clip", "+ Tanh", "+ Z-Score")
POWER_PREFIX = "PowerOPD"
_ALPHA_RE = re.compile(r"α\s*=\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)")


def label_alpha(label: str) -> float | None:
    """The alpha written in a PowerOPD label ("PowerOPD α=500" -> 500.0), else None."""
    if not str(label).startswith(POWER_PREFIX):
        return None
    match = _ALPHA_RE.search(str(label))
    return float(match.group(1)) if match else None


def baseline_of(label: str) -> str | None:
    """The reference or paper baseline a label belongs to; labels may carry a suffix that
    tells groups apart ("Vanilla (training.lr=3e-05)")."""
    for base in BASELINE_ORDER:
        if str(label).startswith(base):
            return base
    return None


def method_sort_key(label: str) -> tuple:
    """The order of every table and legend: references, Full-vocab, Vanilla, the post-hoc
    baselines, PowerOPD by alpha, then every other objective by name."""
    base = baseline_of(label)
    if base is not None:
        return (BASELINE_ORDER.index(base), 0.0, str(label))
    if str(label).startswith(POWER_PREFIX):
        alpha = label_alpha(label)
        return (len(BASELINE_ORDER), alpha if alpha is not None else math.inf, str(label))
    return (len(BASELINE_ORDER) + 1, 0.0, str(label))
