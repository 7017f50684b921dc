"""Limits a config must respect that field types and ranges cannot say alone. Pure functions, no imports
beyond the standard library: the config check (``stages/config.py``) and the DAG's trigger policy may
both call them.

The built-in arithmetic task draws distinct problems for its splits (``stages/tasks.py``,
``ArithmeticTask``): when the splits ask for more problems than the digits and operations allow, the draw
never ends. :func:`arithmetic_sizes_problem` says so before anything runs.
"""

from __future__ import annotations

MAX_FILL = 0.5  # at most this share of the problem space may be drawn (rejection sampling stays fast)


def numbers(min_digits: int, max_digits: int) -> int:
    """How many operands have ``min_digits..max_digits`` digits (one digit: 0-9; d digits: no leading zero)."""
    return sum(10 if d == 1 else 9 * 10 ** (d - 1) for d in range(min_digits, max_digits + 1))


def arithmetic_problems(min_digits: int, max_digits: int, ops) -> int:
    """Distinct problems of the arithmetic task: additions ``a+b`` (``b+a`` is the same problem) and
    multiplications of an operand by one digit 2-9."""
    n = numbers(min_digits, max_digits)
    return (n * (n + 1) // 2 if "add" in ops else 0) + (8 * n if "mul" in ops else 0)


def arithmetic_sizes_problem(min_digits: int, max_digits: int, ops, sizes: dict[str, int]) -> str | None:
    """Why the split sizes cannot be drawn from this problem space in reasonable time, or None."""
    need = sum(int(v) for v in sizes.values())
    space = arithmetic_problems(min_digits, max_digits, ops)
    if need <= space * MAX_FILL:
        return None
    return (
        f"task.sizes ask for {need:,} distinct problems, but {min_digits}-{max_digits}-digit {'/'.join(ops)} problems "
        f"number {space:,} and at most {int(MAX_FILL * 100)}% of them can be drawn: raise task.max_digits or lower task.sizes"
    )
