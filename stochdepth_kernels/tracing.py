"""Graph capture: torch.compile and ``torch.fx`` symbolic tracing (torchvision's and timm's feature
extractors, detection and segmentation backbones) see this package's calls as what they are.

Under either, a call must not decide anything from values that exist only at run time (the rate a
module holds, a batch-mode coin): the graph would keep the decision made while capturing it.
``torch.fx`` passes ``Proxy`` objects instead of tensors; the public functions record themselves as
one graph node for them (:func:`fx_leaf`), as ``torch.fx.wrap`` does for a module's globals, and run
with real tensors when the traced module runs.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.fx import Proxy

try:  # newer torch warns on is_fx_tracing(), which covers torch.export too
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_tracing
except ImportError:  # torch 2.11
    from torch.fx._symbolic_trace import is_fx_tracing as _fx_tracing


def capturing() -> bool:
    """Whether torch.compile or torch.fx is capturing the running code into a graph."""
    return torch.compiler.is_compiling() or _fx_tracing()


def fx_leaf(fn: Callable) -> Callable:
    """``fn``, recorded by ``torch.fx`` tracing as one ``call_function`` node when an argument is a
    ``Proxy`` (its checks and kernels run when the traced module runs)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _fx_tracing():  # a Proxy exists only while torch.fx traces: the common call skips the search
            proxy = next((value for value in (*args, *kwargs.values()) if isinstance(value, Proxy)), None)
            if proxy is not None:
                return proxy.tracer.create_proxy("call_function", call, args, kwargs)
        return fn(*args, **kwargs)

    return call
