"""Answer extraction: the answer a completion gives, as a string, before anyone grades it.

Boxes (``\\boxed{}``, nested braces kept), GSM8K's ``#### N``, the last number, a short
free-text answer ("the answer is X"), a multiple-choice letter. ``graders.py`` decides whether
what is found here is right. Pure functions of strings, like the graders.
"""

from __future__ import annotations

import re

# --------------------------------------------------------------------------- boxes and numbers

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")


def _balanced(text: str, open_at: int) -> tuple[str, int] | None:
    """Contents of the brace group opening at ``open_at`` and the index after it."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{" and text[i - 1] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i], i + 1
    return None  # unbalanced: a completion cut off inside the box


def _all_boxed(text: str) -> list[str]:
    """Contents of every top-level ``\\boxed{..}`` / ``\\fbox{..}`` / ``\\boxed 5``."""
    found, end = [], 0
    for m in _BOX_RE.finditer(text):
        if m.start() < end:
            continue  # nested inside the previous box
        i = m.end()
        if i < len(text) and text[i] == "{":
            group = _balanced(text, i)
            if group is None:
                continue
            content, end = group
        elif m.group(0)[-1].isspace():  # "\boxed 5", seen in MATH solutions
            token = re.match(r"[^\s$]+", text[i:])
            if token is None:
                continue
            content, end = token.group(0), i + token.end()
        else:
            continue
        found.append(_unwrap_box(content.strip()))
    return found


def _unwrap_box(content: str) -> str:
    """``\\boxed{\\boxed{5}}`` → ``5``."""
    inner = _all_boxed(content)
    if len(inner) == 1 and re.fullmatch(r"\\(?:boxed|fbox)\s*\{.*\}", content, re.S):
        return inner[0]
    return content


def extract_boxed(text: str | None, which: str = "last") -> str | None:
    """The contents of the first or last ``\\boxed{}``/``\\fbox{}``, nested braces kept.

    >>> extract_boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{3}")
    '3'
    >>> extract_boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{3}", which="first")
    '\\\\frac{1}{2}'
    """
    if which not in ("first", "last"):
        raise ValueError(f"which must be 'first' or 'last', got {which!r}")
    boxes = _all_boxed(text or "")
    if not boxes:
        return None
    return boxes[0] if which == "first" else boxes[-1]


def extract_hash_answer(text: str | None) -> str | None:
    """The text after the last ``####`` (GSM8K's gold format), up to the end of that line."""
    if not text or "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip()
    return tail.splitlines()[0].strip() if tail else None


DECIMAL = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\d.])(?:-\$?)?(?:{DECIMAL})(?:\s*/\s*(?:{DECIMAL}))?")


def extract_last_number(text: str | None) -> str | None:
    """The last number in ``text`` (sign, thousands commas and simple fractions kept).

    >>> extract_last_number("She pays 3 * $1,250 = $3,750 in total.")
    '3,750'
    """
    if not text:
        return None
    text = text.replace("\u2212", "-")  # unicode minus
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].strip() if numbers else None


def extract_math_answer(text: str | None, which: str = "last") -> str | None:
    """A completion's final answer: a box, else ``#### N``, else the last number.

    We take the LAST box by default. The official MemGen code takes the first; but the
    reference MATH grader (Hendrycks et al.) and most evaluation harnesses take the last,
    and a model that corrects itself ("\\boxed{12} ... wait, ... \\boxed{14}") or boxes
    intermediate results ends with its final answer. Restating the same box at the end
    gives the same value either way. Pass ``which="first"`` to reproduce the official code.
    """
    boxed = extract_boxed(text, which)
    if boxed is not None:
        return boxed
    return extract_hash_answer(text) or extract_last_number(text)


# --------------------------------------------------------------------------- free text

TEXT_COMMAND = r"\\(?:text|textbf|textrm|mathrm|mbox|mathbf)\s*\{([^{}]*)\}"

# The answer runs to the end of its sentence; a period after a lone capital is an initial
# ("J. K. Rowling", "D.C."), not the end.
_ANSWER_IS = re.compile(r"(?i:answer\s*(?:is|:))\s*:?\s*(.+?)(?:(?<!\b[A-Z])\.\s|\.?$|\n)", re.M)


def extract_final_answer(text: str | None) -> str | None:
    """A short free-text answer: a box, else "the answer is X" / "Answer: X", else the
    last non-empty line. Markdown bold and a trailing period are removed."""
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        answer = re.sub(TEXT_COMMAND, r"\1", boxed)
    elif found := _ANSWER_IS.findall(text):
        answer = found[-1]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        answer = lines[-1] if lines else ""
    answer = answer.replace("**", "").strip().rstrip(".").strip()
    return answer or None


# --------------------------------------------------------------------------- choices


def extract_choice_letter(text: str | None, letters: str = "ABCD") -> str | None:
    """The chosen option letter: a boxed letter, "the answer is (B)", a line that is only
    a letter, else the last "(B)" in the text.

    >>> extract_choice_letter("Comparing the options, the answer is (C).")
    'C'
    """
    if not text:
        return None
    cls = f"[{letters}]"
    boxed = extract_boxed(text)
    if boxed is not None:
        inner = re.sub(TEXT_COMMAND, r"\1", boxed).strip().strip("()[]. ")
        if re.fullmatch(cls, inner):
            return inner
    stated = re.findall(
        rf"(?i:answer|option|choice)\s*(?i:is|:|must be|would be|should be|will be)?\s*"
        rf"(?i:option\s*)?:?\s*\(?\**({cls})\**\)?(?![A-Za-z])",
        text,
    )
    if stated:
        return stated[-1]
    alone = re.findall(rf"^\s*\(?\**({cls})\**\)?[.:)]?\s*$", text, re.M)
    if alone:
        return alone[-1]
    parens = re.findall(rf"\(({cls})\)", text)
    return parens[-1] if parens else None
