"""Answer extraction. (Full math-equivalence grading arrives with the evaluation issue.)"""

from __future__ import annotations


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (nested braces allowed), else None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i].strip()
            depth -= 1
    return None
