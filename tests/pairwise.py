"""A pairwise cover of a parametrized test grid: the subset of its cases that the GPU check runs
(``pytest --pairwise``, bench/gpu_check.py) where the full product costs too much device time.

In a pairwise cover every value of every axis, and every pair of values of any two axes, appears in
at least one chosen case: a fault that needs one setting, or two settings together, still shows.
"""
from __future__ import annotations

from itertools import combinations
from typing import Hashable, Sequence


def _covered_by(row: tuple) -> set:
    """What one case covers: the empty setting, each (axis, value), each pair of those."""
    singles = list(enumerate(row))
    return {(), *((single,) for single in singles), *combinations(singles, 2)}


def pairwise_cover(rows: Sequence[tuple[Hashable, ...]]) -> list[int]:
    """Indices, ascending, of a subset of ``rows`` (one value per axis in each) that holds every value
    and every pair of values that some row holds. Greedy and deterministic: each next row chosen is
    the first of those covering the most of what is not yet covered."""
    covers = [_covered_by(tuple(row)) for row in rows]
    uncovered = set().union(*covers)
    chosen = []
    while uncovered:
        best = max(range(len(rows)), key=lambda i: (len(covers[i] & uncovered), -i))
        chosen.append(best)
        uncovered -= covers[best]
    return sorted(chosen)


def _argnames(mark) -> list[str]:
    names = mark.args[0]
    return [name.strip() for name in names.split(",") if name.strip()] if isinstance(names, str) else list(names)


def grid_position(item) -> tuple[tuple, tuple]:
    """(group, row) of a collected test. Each ``parametrize`` mark is one axis (a mark of several
    names, such as ``"x_dtype, r_dtype"``, one axis of pairs) and the row holds its value's index;
    the group is the test function and its other parameters (fixture params such as ``kernel``),
    which are not thinned. Values are compared by ``repr``."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return (item.nodeid,), ()
    axes = [_argnames(mark) for mark in item.iter_markers("parametrize")]
    on_axes = {name for names in axes for name in names}
    fixed = tuple(sorted((name, repr(value)) for name, value in callspec.params.items() if name not in on_axes))
    return (str(item.path), item.originalname, fixed), tuple(repr([callspec.params[name] for name in names])
                                                              for names in axes)


def pairwise_items(items: list) -> list:
    """The items of a pairwise cover of each test's grid, in collection order."""
    groups: dict[tuple, list[tuple[int, tuple]]] = {}
    for index, item in enumerate(items):
        group, row = grid_position(item)
        groups.setdefault(group, []).append((index, row))
    kept = {members[i][0] for members in groups.values() for i in pairwise_cover([row for _, row in members])}
    return [item for index, item in enumerate(items) if index in kept]
