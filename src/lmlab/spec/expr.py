"""A small, safe expression language for derived variables, e.g.
``optimizer.lr: "1e-3 * train.batch_size / 16"`` or ``"1e-3 * sqrt(train.batch_size / 16)"``.

Parsed with ``ast`` and evaluated by walking the tree: numbers, dotted names of other variables,
+ - * / // % **, unary minus, parentheses and a few math functions. Nothing else is accepted,
so a spec can never run code (no ``eval``).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_FUNCS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "log": math.log, "log2": math.log2, "exp": math.exp, "min": min,
    "max": max, "round": round, "int": int, "float": float, "abs": abs,
}


class ExprError(ValueError):
    pass


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def names(expr: str) -> set[str]:
    """The variables an expression reads, as whole dotted paths (``train.batch_size``)."""
    tree = _parse(expr)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        parent = parents.get(node)
        if not isinstance(node, ast.Name | ast.Attribute) or isinstance(parent, ast.Attribute):
            continue  # only the outermost node of a dotted chain
        if isinstance(parent, ast.Call) and parent.func is node:
            continue  # a function name, not a variable
        if (dotted := _dotted(node)) is not None:
            found.add(dotted)
    return found


def _parse(expr: str) -> ast.Expression:
    try:
        return ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ExprError(f"not a valid expression: {expr!r} ({e.msg})") from None


def evaluate(expr: str, variables: Mapping[str, Any]) -> Any:
    tree = _parse(expr)

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) \
                and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name | ast.Attribute):
            name = _dotted(node)
            if name is None or name not in variables:
                raise ExprError(f"unknown variable {name!r} in {expr!r}")
            value = variables[name]
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ExprError(f"variable {name!r} is not a number ({value!r}) in {expr!r}")
            return value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = ev(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in _FUNCS and not node.keywords:
            return _FUNCS[node.func.id](*(ev(a) for a in node.args))
        raise ExprError(f"not allowed in an expression: {ast.unparse(node)!r} in {expr!r}")

    try:
        return ev(tree)
    except (ArithmeticError, ValueError, TypeError) as e:
        if isinstance(e, ExprError):
            raise
        raise ExprError(f"cannot evaluate {expr!r}: {e}") from None
