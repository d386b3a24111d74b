"""Blocks whose ``forward`` takes ``*args`` or ``**kwargs``, for the generic rewrite.

``torch.fx`` turns ``*args`` and ``**kwargs`` into single values, which the forward then cannot
unpack (``f(x, **kwargs)`` raises "Proxy object cannot be iterated"). Hugging Face's layers forward
``**kwargs`` to their attention, and their checkpointing base class wraps every ``forward`` in one
that takes ``(*args, **kwargs)``. Such a forward is traced through the function it wraps
(``__wrapped__``), called with its named parameters only, so the rewritten forward sees none of the
extra arguments. When a caller does pass some, the rewritten block runs its class's own forward
instead: its slots then drop unfused, as at level 3.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

__all__ = ["traceable_class", "with_extra_arguments"]

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_TRACEABLE: dict[type, type] = {}


def _named(forward_class: type) -> tuple[Callable, inspect.Signature] | None:
    """The function ``forward_class.forward`` runs (unwrapped) and its signature without ``*args`` and
    ``**kwargs``; None when the forward takes neither."""
    forward = forward_class.forward
    code = getattr(forward, "__code__", None)
    if code is None or not code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        return None
    function = inspect.unwrap(forward)
    signature = inspect.signature(function)
    return function, signature.replace(parameters=[p for p in signature.parameters.values()
                                                   if p.kind not in _VARIADIC])


def _calling(function: Callable, signature: inspect.Signature) -> Callable:
    """A function with exactly ``signature`` (fx reads its code object) that calls ``function``."""
    parameters = list(signature.parameters.values())
    positional = [p for p in parameters if p.kind in _POSITIONAL]
    keyword = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    header = ", ".join([p.name for p in positional] + (["*"] + [p.name for p in keyword] if keyword else []))
    call = ", ".join([p.name for p in positional] + [f"{p.name}={p.name}" for p in keyword])
    namespace = {"function": function}
    exec(f"def forward({header}):\n    return function({call})\n", namespace)  # noqa: S102 - names from a signature
    forward = namespace["forward"]
    forward.__defaults__ = tuple(p.default for p in positional if p.default is not p.empty) or None
    forward.__kwdefaults__ = {p.name: p.default for p in keyword if p.default is not p.empty} or None
    return forward


def traceable_class(forward_class: type) -> type:
    """``forward_class``, or for a forward with ``*args``/``**kwargs`` a subclass whose forward takes
    the named parameters only."""
    named = _named(forward_class)
    if named is None:
        return forward_class
    if forward_class not in _TRACEABLE:
        traceable = type(forward_class.__name__, (forward_class,), {"__module__": forward_class.__module__})
        traceable.forward = _calling(*named)  # set after the class is made: no __init_subclass__ wraps it
        _TRACEABLE[forward_class] = traceable
    return _TRACEABLE[forward_class]


def with_extra_arguments(traced_forward: Callable, forward_class: type) -> Callable:
    """The rewritten forward as the block's class is called: ``traced_forward`` for the named
    arguments, else (arguments the trace did not see) the class's own forward."""
    named = _named(forward_class)
    if named is None:
        return traced_forward
    function, signature = named
    parameters = list(signature.parameters.values())
    most_positional = sum(p.kind in _POSITIONAL for p in parameters) - 1  # self
    names = {p.name for p in parameters}

    def forward(self: nn.Module, *args, **kwargs):
        if len(args) <= most_positional and names.issuperset(kwargs):
            return traced_forward(self, *args, **kwargs)
        return function(self, *args, **kwargs)

    return forward
