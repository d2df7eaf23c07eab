"""Step-by-step workings for arithmetic expressions (SFT targets for reasoning_gym's arithmetic
tasks, which ship an ``expression`` but no worked solution).

One line per operation, innermost and leftmost first, each result carried into the next line,
then the answer in a box. Every line ends in a newline, a clause boundary where the weaver may
weave (DESIGN.md section 1), so a worked solution gives the memory one insertion point per step.

>>> print(worked_solution("12 - 7 + 30", "35"))
12 - 7 = 5
5 + 30 = 35
The answer is \\boxed{35}.
"""

from __future__ import annotations

import ast
import operator
from fractions import Fraction

_OPS = {
    ast.Add: (operator.add, "+"),
    ast.Sub: (operator.sub, "-"),
    ast.Mult: (operator.mul, "*"),
    ast.Div: (operator.truediv, "/"),
}


class _NotArithmetic(Exception):
    pass


def _fmt(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return str(float(value))


def _walk(node: ast.AST, lines: list[str]) -> Fraction:
    """Value of ``node``; appends a line for every operation it performs."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        if isinstance(node.operand, ast.Constant):  # a signed number, not an operation
            return sign * _walk(node.operand, lines)
        value = _walk(node.operand, lines)
        if sign < 0:
            lines.append(f"-({_fmt(value)}) = {_fmt(-value)}")
        return sign * value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _walk(node.left, lines), _walk(node.right, lines)
        fn, symbol = _OPS[type(node.op)]
        if isinstance(node.op, ast.Div) and right == 0:
            raise _NotArithmetic
        value = fn(left, right)
        lines.append(f"{_fmt(left)} {symbol} {_fmt(right)} = {_fmt(value)}")
        return value
    raise _NotArithmetic


def worked_solution(expression: str, answer: str) -> str | None:
    """The working of ``expression`` ending in ``\\boxed{answer}``; None when the expression
    is not plain arithmetic (+ - * / on numbers, parentheses, signs) or its value is not
    ``answer`` (a rounded answer, say), so that a target never contradicts the gold answer.

    >>> print(worked_solution("-( 5 + -2 )", "-3"))
    5 + -2 = 3
    -(3) = -3
    The answer is \\boxed{-3}.
    >>> worked_solution("2 ** 3", "8") is None, worked_solution("1 + 1", "3") is None
    (True, True)
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        lines: list[str] = []
        value = _walk(tree.body, lines)
        gold = Fraction(answer.strip())
    except (SyntaxError, ValueError, ZeroDivisionError, _NotArithmetic):
        return None
    if value != gold:
        return None
    return "\n".join([*lines, f"The answer is \\boxed{{{answer.strip()}}}."])
