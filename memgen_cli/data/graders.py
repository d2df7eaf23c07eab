"""Grading as pure functions of strings: is the answer that ``extraction.py`` found right?

Families: numbers (GSM8K-style), LaTeX answers (MATH), short-answer QA (TriviaQA),
multiple choice (GPQA), and the generic graders ``exact``, ``numeric``, ``boxed`` and
``contains`` that the ``jsonl`` task offers. ``math_accuracy_reward`` is the same check in
the TRL reward-function form. Nothing here touches a model, a file or the network.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable

from memgen_cli.data.extraction import (
    DECIMAL,
    TEXT_COMMAND,
    extract_boxed,
    extract_final_answer,
    extract_hash_answer,
    extract_math_answer,
)

# --------------------------------------------------------------------------- numbers

_SIGNED = rf"-?\s*(?:{DECIMAL})"
_LATEX_FRAC = re.compile(
    rf"^(-?)\\[dt]?frac\s*(?:\{{\s*({_SIGNED})\s*\}}|(\d))\s*(?:\{{\s*({_SIGNED})\s*\}}|(\d))$"
)
_SLASH_FRAC = re.compile(rf"^({_SIGNED})\s*/\s*({_SIGNED})$")
# Unit words must be set off by a space, so that "2x" is not read as 2 (with unit "x").
_NUMBER_WITH_UNITS = re.compile(r"^(.*?\d\}?)(?:\s+[A-Za-z][A-Za-z\s.'/-]*?(?:\^\{?\d\}?)?)?$")


def _clean_number_text(s: str) -> str:
    t = s.strip().replace("\u2212", "-").replace("\u2013", "-")
    t = re.sub(TEXT_COMMAND, r" \1 ", t)
    for junk in ("\\$", "$", "\\%", "%", "\\!", "\\,", "\\;", "\\left", "\\right", "°"):
        t = t.replace(junk, "")
    t = re.sub(r"\^\s*\{?\\circ\}?", "", t)
    t = re.split(r"=|(?<=[A-Za-z])\s*:", t)[-1]  # "x = 5", "Answer: 5" (but not "3:4")
    t = t.strip().rstrip(".,;!").strip()
    if t.startswith("{") and t.endswith("}"):
        t = t[1:-1].strip()
    return t


def _to_float(s: str) -> float:
    return float(s.replace(",", "").replace(" ", ""))


def to_number(s: str | float | int | None) -> float | None:
    """Parse an answer as a number, or None: ``$1,000.``, ``-3``, ``75%``, ``3/4``,
    ``\\frac{3}{4}``, ``\\dfrac34``, ``18 dollars`` (trailing unit words are dropped).

    >>> to_number("\\\\dfrac{-3}{4}"), to_number("$1,250.00"), to_number("12 apples")
    (-0.75, 1250.0, 12.0)
    """
    if s is None:
        return None
    if isinstance(s, int | float):
        return float(s)
    t = _clean_number_text(s)
    m = _NUMBER_WITH_UNITS.match(t)
    if m is None:
        return None
    t = m.group(1).strip()
    try:
        if frac := _LATEX_FRAC.match(t):
            sign, num_a, num_b, den_a, den_b = frac.groups()
            value = _to_float(num_a or num_b) / _to_float(den_a or den_b)
            return -value if sign else value
        if frac := _SLASH_FRAC.match(t):
            return _to_float(frac.group(1)) / _to_float(frac.group(2))
        if re.fullmatch(_SIGNED, t):
            return _to_float(t)
    except (ZeroDivisionError, ValueError):
        return None
    return None


def normalize_number(s: str | None) -> str | None:
    """A canonical string for a number (``"18.0"`` → ``"18"``, ``"3/4"`` → ``"0.75"``).

    >>> normalize_number("$18.00"), normalize_number("\\\\frac{3}{4}"), normalize_number("n/a")
    ('18', '0.75', None)
    """
    value = to_number(s)
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.10g}"


def numeric_equal(a: str | float | None, b: str | float | None, rel_tol: float = 1e-6) -> bool:
    """True when both parse as numbers that agree within ``rel_tol``."""
    x, y = to_number(a), to_number(b)
    if x is None or y is None:
        return False
    return math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9)


# --------------------------------------------------------------------------- MATH (LaTeX)


def _brace_fracs(t: str) -> str:
    """``\\frac12`` → ``\\frac{1}{2}``, ``\\frac1{2}`` and ``\\frac{1}2`` likewise."""
    t = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", t)
    t = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", t)
    return re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", t)


def _strip_text_commands(t: str) -> str:
    """Trailing ``\\text{ units}`` after a value are dropped; other ``\\text{X}`` become X."""
    units = re.sub(rf"^(.*\S)\s*{TEXT_COMMAND}\s*(\^\{{?\d\}}?)?$", r"\1", t)
    if units != t and re.search(r"[\d}]$", units):
        t = units
    return re.sub(TEXT_COMMAND, r"\1", t)


def normalize_latex_answer(s: str | None) -> str:
    """Canonical form of a MATH answer, so that equal answers compare equal as strings.

    >>> normalize_latex_answer("\\\\left( \\\\dfrac12, 3 \\\\right)")
    '(\\\\frac{1}{2},3)'
    """
    if s is None:
        return ""
    t = s.strip().replace("\n", " ")
    t = re.sub(r"\\[dt]frac", r"\\frac", t)
    for cmd in ("\\left", "\\right", "\\displaystyle"):
        t = t.replace(cmd, "")
    # Spacing commands such as "\," and "\ ", but not the matrix row break "\\".
    t = re.sub(r"(?<!\\)\\[,;:! ]|\\q?quad|~", " ", t)
    t = re.sub(r"\^\s*\{?\\circ\}?|°", "", t)
    t = t.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    t = _strip_text_commands(t.strip())
    if t.count("=") == 1 and len(t.split("=")[0].strip()) <= 2:
        t = t.split("=")[1]  # "x = 5" → "5"; longer left sides are part of the answer
    t = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", t)
    t = t.replace(" ", "").rstrip(".")
    t = _brace_fracs(t)
    if m := re.fullmatch(r"(-?\d+)/(\d+)", t):
        t = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    t = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", t)
    return re.sub(r"^(-?\d+)\.0*$", r"\1", t)


def math_equal(pred: str | None, gold: str | None) -> bool:
    """MATH-style equality: equal normalised strings, or equal numbers (``0.5`` = ``\\frac12``)."""
    if pred is None or gold is None:
        return False
    a, b = normalize_latex_answer(pred), normalize_latex_answer(gold)
    if a and a == b:
        return True
    # Numbers are compared on the raw strings: normalising removes the spaces that tell
    # "18 dollars" (a unit) from "2x" (not a number).
    return numeric_equal(pred, gold)


# --------------------------------------------------------------------------- QA


_PUNCT = set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d"}


def normalize_qa(s: str | None) -> str:
    """SQuAD/TriviaQA normalisation: lowercase, no punctuation or articles, single spaces."""
    t = (s or "").lower()
    t = "".join(ch for ch in t if ch not in _PUNCT)
    t = re.sub(r"\b(a|an|the)\b", " ", t)
    return " ".join(t.split())


def qa_exact_match(pred: str | None, aliases: list[str] | str) -> bool:
    """True when the normalised prediction equals a normalised alias."""
    if pred is None:
        return False
    aliases = [aliases] if isinstance(aliases, str) else aliases
    p = normalize_qa(pred)
    return bool(p) and any(p == normalize_qa(a) for a in aliases)


# --------------------------------------------------------------------------- generic


def _exact_key(s: str | None) -> str:
    return " ".join((s or "").split()).casefold().rstrip(".")


def grade_exact(completion: str, gold: str) -> float:
    """Extracted final answer equals gold, ignoring case, spacing and a final period."""
    pred = extract_final_answer(completion)
    return float(pred is not None and _exact_key(pred) == _exact_key(gold))


def _gold_number(gold: str) -> str:
    return extract_hash_answer(gold) or gold


def grade_numeric(completion: str, gold: str) -> float:
    """Extracted number (box → ``####`` → last number) equals the gold number."""
    return float(numeric_equal(extract_math_answer(completion), _gold_number(gold)))


def grade_boxed(completion: str, gold: str) -> float:
    """The last box is MATH-equal to gold; no box scores 0."""
    return float(math_equal(extract_boxed(completion), _gold_number(gold)))


def grade_contains(completion: str, gold: str) -> float:
    """The normalised gold appears as whole words in the normalised completion."""
    g = normalize_qa(gold)
    return float(bool(g) and f" {g} " in f" {normalize_qa(completion)} ")


GRADERS: dict[str, Callable[[str, str], float]] = {
    "exact": grade_exact,
    "numeric": grade_numeric,
    "boxed": grade_boxed,
    "contains": grade_contains,
}
EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "exact": extract_final_answer,
    "numeric": extract_math_answer,
    "boxed": extract_boxed,
    "contains": extract_final_answer,
}


# --------------------------------------------------------------------------- rewards


def completion_text(completion: str | list[dict]) -> str:
    """The text of a TRL completion: a string, or the last message of a conversation."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1]["content"]) if completion else ""


def math_accuracy_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """TRL reward: 1.0 where the completion's final answer is MATH-equal to ``answer``.

    ``answer`` is the dataset column TRL passes by name; GSM8K-style gold (``... #### 18``)
    is reduced to its number.

    >>> math_accuracy_reward(["So she makes \\\\boxed{18}.", "I get 17."], answer=["18", "18"])
    [1.0, 0.0]
    >>> math_accuracy_reward([[{"role": "assistant", "content": "#### 1,000"}]], answer=["1000"])
    [1.0]
    """
    return [
        float(math_equal(extract_math_answer(completion_text(c)), _gold_number(str(a))))
        for c, a in zip(completions, answer, strict=True)
    ]


_NUM = r"-?\d+(?:\.\d+)?"
_STEP = re.compile(rf"({_NUM}(?:\s*[-+*/]\s*{_NUM})+)\s*=\s*({_NUM})(?![\d.])")


def _arith(expr: str) -> float | None:
    """The value of ``expr``: numbers and + - * / only (no names, calls or powers)."""
    import ast

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(
            node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)
        ):
            a, b = value(node.left), value(node.right)
            ops = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}
            return ops[type(node.op)] if type(node.op) in ops else (a / b if b else math.nan)
        raise ValueError("not arithmetic")

    try:
        return value(ast.parse(expr, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):
        return None


def equation_steps_reward(completions: list, **kwargs) -> list[float]:
    """TRL reward: the fraction of the completion's written steps ``a op b ... = c`` that are
    right, a process reward for step-by-step arithmetic (0 where it writes none).

    Dense where accuracy is not: on a multi-step problem the policy mostly gets wrong, the
    completions of one prompt still differ in how many steps they get right. Use it beside
    the task's accuracy (``--reward memgen_cli.data.graders:equation_steps_reward``).

    >>> equation_steps_reward(["2 - 6 = -4\\n-4 + 3 = -1\\nThe answer is -1.", "12 + 7 = 18", "7"])
    [1.0, 0.0, 0.0]
    >>> equation_steps_reward([[{"role": "assistant", "content": "3 * 4 = 12, 12 - 5 = 8"}]])
    [0.5]
    """
    out = []
    for c in completions:
        steps = _STEP.findall(completion_text(c))
        right = 0
        for lhs, rhs in steps:
            got = _arith(lhs)
            right += got is not None and abs(got - float(rhs)) < 1e-6
        out.append(right / len(steps) if steps else 0.0)
    return out


_CHAIN = re.compile(rf"{_NUM}(?:\s*[-+]\s*{_NUM})+")
_BINARY_STEP = re.compile(rf"({_NUM})\s*([-+])\s*({_NUM})\s*=\s*({_NUM})(?![\d.])")


def _chain(question: str) -> tuple[list[float], list[str]] | None:
    """The flat ``+``/``-`` chain a question asks for (its longest), as (numbers, operators)."""
    found = _CHAIN.findall(question or "")
    if not found:
        return None
    expr = max(found, key=len)
    first = re.match(_NUM, expr)
    nums, ops = [float(first[0])], []
    for m in re.finditer(rf"\s*([-+])\s*({_NUM})", expr[first.end() :]):
        ops.append(m[1])
        nums.append(float(m[2]))
    return nums, ops


def chain_steps_reward(completions: list, question: list, **kwargs) -> list[float | None]:
    """TRL reward: the fraction of the question's ``+``/``-`` chain that the completion works
    through one operation per step, left to right, each step starting from the result the
    previous step wrote (``62 - 66 = -4``, then ``-4 - 47 = ...``), right or wrong.

    A structure reward for chained arithmetic (as a format reward is for a reasoning format):
    it scores what accuracy cannot see on the problems a policy mostly gets wrong, skipping a
    step (``62 - 66 - 47 = 12``) or carrying the wrong operand or operator into the next one,
    while the arithmetic itself is left to the accuracy reward beside it (``--reward
    memgen_cli.data.graders:chain_steps_reward``). ``None`` (does not apply) where the question
    holds no chain of two or more numbers.

    >>> q = "Calculate 62 - 66 - 47."
    >>> chain_steps_reward(["62 - 66 = -4\\n-4 - 47 = -50\\nThe answer is -50.",
    ...     "62 - 66 = -4\\n4 - 47 = -43", "62 - 66 - 47 = 12", "62 - 66 = 3"], question=[q] * 4)
    [1.0, 0.5, 0.0, 0.5]
    >>> chain_steps_reward(["7 + 8 = 16"], question=["What is the total?"])
    [None]
    """
    out: list[float | None] = []
    for c, q in zip(completions, question, strict=True):
        chain = _chain(q)
        if chain is None:
            out.append(None)
            continue
        nums, ops = chain
        current, done = nums[0], 0
        for m in _BINARY_STEP.finditer(completion_text(c)):
            if done == len(ops):
                break
            a, op, b, result = float(m[1]), m[2], float(m[3]), float(m[4])
            if a != current or op != ops[done] or b != nums[done + 1]:
                break
            current, done = result, done + 1
        out.append(done / len(ops))
    return out
