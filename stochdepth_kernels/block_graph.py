"""The generic rewrite of one residual block: its forward traced by ``torch.fx`` (every submodule a
leaf), each residual tail ``residual + drop(branch)`` found in the graph and turned into the fused
op, and the branch cut out as a function of the block's values so that a dropped sample or batch
skips its compute. No block type's forward is copied: the code a rewritten block runs is its own
forward's graph, regenerated.

A tail is the call of a drop slot (a module of :data:`DROP_MODULE_TYPES`, or an ``nn.Identity`` held
under a drop-path name, or a function of :func:`register_drop_function`) whose one user is an add
with another tensor (``+``, ``+=``, ``torch.add``, ``Tensor.add``), optionally followed by a ReLU.
Levels, best first (``Tail.level``):

1. the branch (the nodes only the drop's input needs) is cut out: ``DropPathAdd.add_branch`` runs it
   (batch mode skips it when the coin drops, the subset method runs it on the kept rows);
2. the fused add of the computed branch (``DropPathAdd.forward``): the branch shares work with the
   rest of the block, or would mutate a value outside it;
3. the unary ``drop_path`` where the drop's value is not added to anything.

A block whose forward cannot be traced, or whose graph depends on ``self.training``, is not
rewritten (:class:`Untraceable`): surgery puts the unary :class:`~stochdepth_kernels.DropPath` in its
slots.
"""
from __future__ import annotations

import builtins
import linecache
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from stochdepth_kernels.branch_skip import arguments_with
from stochdepth_kernels.named_forward import traceable_class, with_extra_arguments

__all__ = ["DROP_SLOT_NAME", "Tail", "Untraceable", "drop_module_types", "is_drop_module", "register_drop_function",
           "register_drop_module", "trace_tails"]

# An nn.Identity (timm's rate-0 slot) or None (timm's ResNet) under such a name is a drop slot.
DROP_SLOT_NAME = re.compile(r"drop_?path|stochastic_(depth|dropout)|drop_connect", re.IGNORECASE)

_DROP_MODULES: list[type] = []
_DROP_FUNCTIONS: list[Callable] = []

_ADDS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_RELUS = {torch.relu, torch.relu_, F.relu}
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda"}
_METADATA_METHODS = {"size", "dim", "numel"}
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
               operator.neg, operator.getitem}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.setitem}


def register_drop_module(cls: type) -> None:
    """Makes modules of type ``cls`` (called as ``drop(branch)``) drop slots that surgery rewrites."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be a torch.nn.Module subclass, got {cls!r}")
    if cls not in _DROP_MODULES:
        _DROP_MODULES.append(cls)


def register_drop_function(fn: Callable) -> None:
    """Makes calls of ``fn(branch, ...)`` (a function, not a module) drop slots that surgery rewrites."""
    if not callable(fn) or isinstance(fn, (type, nn.Module)):
        raise TypeError(f"fn must be a function, got {fn!r}")
    if fn not in _DROP_FUNCTIONS:
        _DROP_FUNCTIONS.append(fn)


def drop_module_types() -> tuple[type, ...]:
    return tuple(_DROP_MODULES)


def is_drop_module(module: nn.Module) -> bool:
    """Whether ``module`` fills a drop slot: a registered type, or a copy of timm's by name and state,
    a class named ``...DropPath`` with a number ``drop_prob`` and no parameters or children (each
    Hugging Face model defines its own, e.g. ``Dinov2DropPath``)."""
    if isinstance(module, drop_module_types()):
        return True
    return (type(module).__name__.lower().endswith("droppath") and isinstance(getattr(module, "drop_prob", None), float)
            and next(module.children(), None) is None and next(module.parameters(), None) is None)


def drop_functions() -> tuple[Callable, ...]:
    return tuple(_DROP_FUNCTIONS)


class Untraceable(Exception):
    """The block's forward cannot be rewritten; the message says why."""


@dataclass
class Tail:
    """One residual of a block: the drop slot (attribute name, or ``fn:<i>`` for the i-th call of a
    registered drop function), its level (1, 2 or 3, see the module's docstring), whether a ReLU
    follows the add, and why the level is not 1."""
    slot: str
    level: int
    relu: bool = False
    reason: str = ""


@dataclass
class _Cut:
    """A branch cut out of the graph: its nodes in order, the values it reads (inputs), which of those
    may be per-sample (the subset method indexes them when their first dimension is the batch), and
    the metadata nodes (shapes) it recomputes from its own inputs."""
    nodes: list[fx.Node]
    inputs: list[fx.Node]
    per_sample: tuple[int, ...]
    recomputed: list[fx.Node] = field(default_factory=list)


class _BlockTracer(fx.Tracer):
    """Traces one block's own forward: every submodule is a leaf, timm's untraceable helpers are
    recorded as calls."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(_timm_autowrap_functions()))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def _timm_autowrap_functions() -> Iterable[Callable]:
    try:
        from timm.layers import _fx
    except ImportError:  # pragma: no cover - timm is optional
        return ()
    return [fn for fn in _fx._autowrap_functions if callable(fn)]


def trace(block: nn.Module, forward_class: type) -> fx.Graph:
    """The graph of ``forward_class.forward`` on ``block`` (its class swapped for the trace), the same
    in train and eval (else :class:`Untraceable`: the rewrite would freeze one mode's code)."""
    graphs = []
    current_class, training = type(block), block.training
    before = set(vars(block))
    try:
        block.__class__ = traceable_class(forward_class)
        for mode in (True, False):
            block.training = mode
            graphs.append(_BlockTracer().trace(block))
    except Untraceable:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of fx's trace means: not traceable
        raise Untraceable(f"torch.fx cannot trace its forward ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:120] if str(error) else ''})") from None
    finally:
        block.__class__, block.training = current_class, training
        for name in set(vars(block)) - before:  # fx's constants of tensors made in the forward
            delattr(block, name)
    if any(n.op == "get_attr" and n.target.startswith("_tensor_constant") for g in graphs for n in g.nodes):
        raise Untraceable("its forward makes tensors from constants (fx would store them on the block)")
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise Untraceable("its forward differs between train and eval")
    return graphs[0]


def _slot_of(node: fx.Node, slots: set[str], calls: dict) -> str | None:
    """The drop slot ``node`` calls: a direct submodule among ``slots``, or the ``fn:<i>`` name of a
    registered drop function's call (numbered in graph order through ``calls``)."""
    if node.op == "call_module" and node.target in slots:
        return node.target
    if node.op == "call_function" and node.target in _DROP_FUNCTIONS:
        return calls.setdefault(node, f"fn:{len(calls)}")
    return None


def _is_add(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    return ((node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target in _ADD_METHODS))


def _relu_after(node: fx.Node, block: nn.Module) -> fx.Node | None:
    """The ReLU that is the one user of ``node``, if there is one."""
    if len(node.users) != 1:
        return None
    user = next(iter(user for user in node.users))
    if not user.args or user.args[0] is not node or len(user.args) > 1:
        return None
    if user.op == "call_module" and type(block.get_submodule(user.target)) is nn.ReLU:
        return user
    if user.op == "call_function" and user.target in _RELUS and set(user.kwargs) <= {"inplace"}:
        return user
    if user.op == "call_method" and user.target in ("relu", "relu_") and not user.kwargs:
        return user
    return None


def _metadata(node) -> bool:
    """Whether ``node`` computes only from tensors' metadata (shape, size, dtype) and constants:
    values a cut-out branch recomputes from its own (possibly row-indexed) inputs."""
    if not isinstance(node, fx.Node):
        return True
    if node.op == "call_function" and node.target is builtins.getattr:
        return node.args[1] in _METADATA_ATTRIBUTES
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return True
    if node.op == "call_function" and node.target in _ARITHMETIC:
        return all(_metadata(a) for a in node.args) and any(isinstance(a, fx.Node) for a in node.args)
    return False


def _carries_data(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose values derive from the block's inputs' data (not only from their shapes, the
    block's parameters and buffers, or constants): those a branch may receive per sample."""
    carrying: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            carrying.add(node)
        elif node.op in ("call_function", "call_method", "call_module") and not _metadata(node):
            if any(n in carrying for n in node.all_input_nodes):
                carrying.add(node)
    return carrying


def _mutates_outside(node: fx.Node, owned: set[fx.Node], block: nn.Module) -> bool:
    """Whether ``node`` writes in place into a value that is not in ``owned``."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node) or first in owned:
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__")) or \
            bool(node.kwargs.get("inplace"))
    if node.op == "call_module":
        return bool(getattr(block.get_submodule(node.target), "inplace", False))
    return False


def _cut(graph: fx.Graph, value: fx.Node, drop: fx.Node, block: nn.Module) -> tuple[_Cut | None, str]:
    """The branch that computes ``value`` (the drop's input): the nodes only it needs, or None and why."""
    if value.op in ("placeholder", "get_attr") or set(value.users) != {drop}:
        return None, "the branch's value is used outside the drop"
    order = {node: index for index, node in enumerate(graph.nodes)}
    owned = {value}
    for node in reversed(list(graph.nodes)[:order[value]]):
        if node.op in ("call_function", "call_method", "call_module", "get_attr") and node.users \
                and all(user in owned for user in node.users):
            owned.add(node)
    _release_item_reads(owned, value)
    nodes = sorted(owned, key=order.__getitem__)
    if any(_mutates_outside(node, owned, block) for node in nodes):
        return None, "the branch writes in place into a value outside it"
    recomputed: set[fx.Node] = set()
    inputs: list[fx.Node] = []
    pending = [n for node in nodes for n in node.all_input_nodes if n not in owned]
    while pending:
        node = pending.pop()
        if node in owned or node in recomputed or node in inputs:
            continue
        if _metadata(node) and node.op != "placeholder":
            recomputed.add(node)
            pending.extend(node.all_input_nodes)
        else:
            inputs.append(node)
    inputs.sort(key=order.__getitem__)
    carrying = _carries_data(graph)
    per_sample = tuple(i for i, node in enumerate(inputs) if node in carrying)
    return _Cut(nodes, inputs, per_sample, sorted(recomputed, key=order.__getitem__)), ""


_MULTIPLIES = {operator.mul, operator.imul, torch.mul}


def _constant(node, graph_inputs: set[fx.Node]) -> bool:
    """Whether ``node`` is a number or computed from the block's parameters and buffers only."""
    if not isinstance(node, fx.Node):
        return isinstance(node, (int, float))
    if node.op == "get_attr":
        return True
    if node.op == "placeholder" or node in graph_inputs:
        return False
    return node.op in ("call_function", "call_method") and all(_constant(n, graph_inputs) for n in node.all_input_nodes)


def _scaled(node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` multiplies ``value`` by a constant (a number, a parameter or a view of one)."""
    multiply = (node.op == "call_function" and node.target in _MULTIPLIES) or \
        (node.op == "call_method" and node.target in ("mul", "mul_"))
    if not multiply or node.kwargs or len(node.args) != 2 or value not in node.args:
        return False
    other = node.args[1] if node.args[0] is value else node.args[0]
    return _constant(other, {value})


def _is_scale_module(module: nn.Module) -> bool:
    """Whether ``module``'s forward multiplies its one input by a constant (timm's ``LayerScale``), or
    is ``nn.Identity`` (a layer scale switched off)."""
    if type(module) is nn.Identity:
        return True
    try:
        graph = _BlockTracer().trace(module)
    except Exception:  # noqa: BLE001 - not traceable: not known to be a scale
        return False
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    output = next(node for node in graph.nodes if node.op == "output").args[0]
    return len(inputs) == 1 and isinstance(output, fx.Node) and _scaled(output, inputs[0])


def _commute_scales(graph: fx.Graph, block: nn.Module, drops: list[fx.Node]) -> None:
    """``scale(drop(b))`` becomes ``drop(scale(b))`` (a per-sample mask commutes with a constant
    factor), so that a drop inside a layer scale (timm's MetaFormer) or before a block's gain (NFNet)
    meets its add."""
    for drop in drops:
        while len(drop.users) == 1 and drop.args and isinstance(drop.args[0], fx.Node):
            user = next(iter(drop.users))
            module_scale = user.op == "call_module" and len(user.args) == 1 and not user.kwargs \
                and _is_scale_module(block.get_submodule(user.target))
            if not (module_scale or _scaled(user, drop)):
                break
            value = drop.args[0]
            user.replace_all_uses_with(drop)
            user.replace_input_with(drop, value)
            drop.replace_input_with(value, user)
            user.append(drop)  # the drop now follows the scale


def find_tails(graph: fx.Graph, block: nn.Module, slots: set[str]) -> list[tuple[Tail, fx.Node, fx.Node | None,
                                                                               fx.Node | None]]:
    """Each call of a drop slot in ``graph``: ``(tail, drop node, add node or None, relu node or None)``
    with the tail's level before the branch is cut (1 where an add follows, else 3)."""
    calls: dict = {}
    slot_of = {node: slot for node in graph.nodes if (slot := _slot_of(node, slots, calls)) is not None}
    _commute_scales(graph, block, list(slot_of))
    found = []
    for node, slot in slot_of.items():
        add = next(iter(node.users)) if len(node.users) == 1 else None
        value = node.args[0] if node.args else None
        if node.op == "call_module" and (len(node.args) != 1 or node.kwargs):
            value = None
        if not isinstance(value, fx.Node) or add is None or not _is_add(add) \
                or not all(isinstance(a, fx.Node) for a in add.args) or add.args[0] is add.args[1]:
            found.append((Tail(slot, 3, reason="the drop's value is not added to a residual"), node, None, None))
            continue
        relu = _relu_after(add, block)
        found.append((Tail(slot, 1, relu=relu is not None), node, add, relu))
    return found


def trace_tails(block: nn.Module, forward_class: type, slots: set[str], inserted: str | None = None) -> list[Tail]:
    """The tails of ``block`` (its forward from ``forward_class``; ``inserted``: the drop slot to put
    on its residual add, :func:`insert_drop`) with their levels; raises :class:`Untraceable`."""
    return [tail for tail, *_ in _rewrite(_traced(block, forward_class, inserted), block, slots)[1]]


def _traced(block: nn.Module, forward_class: type, inserted: str | None) -> fx.Graph:
    graph = trace(block, forward_class)
    if inserted is not None:
        insert_drop(graph, inserted)
    return graph


def insert_drop(graph: fx.Graph, attribute: str) -> None:
    """For a block without a drop slot (torchvision's ResNet blocks): a call of ``attribute`` put on
    the branch side of the last add of the block's input (or of a module applied to the inputs only,
    its downsample) to another value."""
    def shortcut(node: fx.Node) -> bool:
        return node.op == "placeholder" or (node.op == "call_module" and bool(node.all_input_nodes)
                                            and all(n.op == "placeholder" for n in node.all_input_nodes))

    adds = [node for node in graph.nodes if _is_add(node) and all(isinstance(a, fx.Node) for a in node.args)
            and sum(shortcut(a) for a in node.args) == 1]
    if not adds:
        raise Untraceable("no add of the block's input (or its downsample) to a branch in its forward")
    add = adds[-1]
    branch = add.args[0] if shortcut(add.args[1]) else add.args[1]
    with graph.inserting_before(add):
        drop = graph.call_module(attribute, (branch,))
    add.replace_input_with(branch, drop)


def slot_attribute(slot: str) -> str:
    """The block's attribute that holds a slot's module (a registered function's call gets one)."""
    return f"_stochdepth_drop{slot[3:]}" if slot.startswith("fn:") else slot


def _rewrite(graph: fx.Graph, block: nn.Module, slots: set[str]) -> tuple[dict, list]:
    """Rewrites ``graph`` in place: each tail's add (and ReLU) becomes the fused call. Returns the
    branch functions' graphs and parameter owners by attribute name, and the tails with their nodes."""
    branches: dict[str, tuple[fx.Graph, tuple[str, ...]]] = {}
    tails = find_tails(graph, block, slots)
    for tail, drop, add, relu in tails:
        attribute = slot_attribute(tail.slot)
        value = drop.args[0]
        module = getattr(block, attribute, None)
        if add is None:
            if hasattr(module, "unary"):  # a slot that also serves fused tails: its unary form
                with graph.inserting_before(drop):
                    replacement = graph.call_method("unary", (graph.get_attr(attribute), value))
                drop.replace_all_uses_with(replacement)
                graph.erase_node(drop)
            continue
        if getattr(module, "activation", None) != "relu":
            relu = None
        branch_first = add.args[0] is drop
        residual = add.args[1] if branch_first else add.args[0]
        last = relu or add
        cut, reason = _cut(graph, value, drop, block)
        with graph.inserting_before(last):
            if cut is None:
                tail.level, tail.reason = 2, reason
                fused = graph.call_function(fused_add, (graph.get_attr(attribute), value, residual, branch_first))
            else:
                name = f"_stochdepth_branch{len(branches)}"
                owners = _parameter_owners(cut)
                branches[name] = (_branch_graph(cut, value), owners)
                fused = graph.call_function(run_tail, (graph.get_attr(attribute), graph.get_attr(name),
                                                       graph.get_attr(f"{name}_parameters"), owners, residual,
                                                       branch_first, cut.per_sample, *cut.inputs))
        last.replace_all_uses_with(fused)
        for node in (relu, add, drop, *reversed(cut.nodes if cut else ())):
            if node is not None:
                graph.erase_node(node)
        if cut:
            _erase_unused(graph, cut.recomputed)
    graph.lint()
    return branches, tails


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    for node in reversed(nodes):
        if not node.users:
            graph.erase_node(node)


def _release_item_reads(owned: set[fx.Node], value: fx.Node) -> None:
    """Leaves outside the branch each item read (``y[0]``) of a value computed outside it, and then
    whatever that frees: the branch receives the item itself (a tuple's tensor, or a row of the batch
    taken before the subset method picks rows), as the block computed it."""
    changed = True
    while changed:
        changed = False
        for node in list(owned):
            outside_item = node.op == "call_function" and node.target is operator.getitem and \
                isinstance(node.args[0], fx.Node) and node.args[0] not in owned and not _metadata(node)
            if node is not value and (outside_item or any(user not in owned for user in node.users)):
                owned.discard(node)
                changed = True


def _branch_graph(cut: _Cut, value: fx.Node) -> fx.Graph:
    """The branch as a graph of its own: one placeholder per input, the recomputed metadata, its
    nodes, its value as the output."""
    graph = fx.Graph()
    mapping = {node: graph.placeholder(f"in{index}") for index, node in enumerate(cut.inputs)}
    for node in cut.recomputed + cut.nodes:
        mapping[node] = graph.node_copy(node, mapping.__getitem__)
    graph.output(mapping[value])
    return graph


def _parameter_owners(cut: _Cut) -> tuple[str, ...]:
    """The submodules and attributes the branch reads: their parameters are its weights."""
    return tuple(dict.fromkeys(node.target for node in cut.nodes if node.op in ("call_module", "get_attr")))


def _unmodified_eval(drop) -> bool:
    """Whether the tail computes what the block computed before surgery: eval with timm's scaling."""
    return not drop.training and drop.scale_by_keep


def _block_add(drop, y: Tensor, residual: Tensor, branch_first: bool) -> Tensor:
    """The block's own add in its operand order (its output's memory format follows the first
    operand, which later convolutions' arithmetic depends on), then the fused ReLU."""
    out = y + residual if branch_first else residual + y
    return torch.relu(out) if drop.activation == "relu" else out


def fused_add(drop, y: Tensor, residual: Tensor, branch_first: bool) -> Tensor:
    """A level-2 tail: ``drop(y, residual)``; in eval with timm's scaling the block's own add, so that
    eval outputs stay bit-identical to the unmodified model's."""
    return _block_add(drop, y, residual, branch_first) if _unmodified_eval(drop) else drop(y, residual)


def run_tail(drop, branch: Callable, parameters: Callable, owners: tuple[str, ...], residual: Tensor,
             branch_first: bool, per_sample: tuple[int, ...], *inputs) -> Tensor:
    """``drop.add_branch`` for a cut-out branch ``branch(*inputs)``, a method of the block that runs
    the block's attributes ``owners`` (eval with timm's scaling: the block's own add, as
    :func:`fused_add`): with the subset method, the inputs at ``per_sample`` whose first dimension is
    the residual's batch are given as kept rows, the others as they are."""
    if _unmodified_eval(drop):
        return _block_add(drop, branch(*inputs), residual, branch_first)
    if drop.mode != "subset":
        return drop.add_branch(branch, residual, parameters, inputs, module=branch.__self__, submodules=owners)
    batch = residual.shape[0]
    rows = [i for i in per_sample if isinstance(inputs[i], Tensor) and inputs[i].dim() > 0
            and inputs[i].shape[0] == batch]
    if not rows:  # no input carries the batch: the subset method keeps rows of the whole branch
        return drop(branch(*inputs), residual)

    def on_kept_rows(*kept: Tensor) -> Tensor:
        return branch(*arguments_with(inputs, rows, kept))

    return drop.add_branch(on_kept_rows, residual, parameters, tuple(inputs[i] for i in rows))


def compile_graph(graph: fx.Graph, name: str) -> Callable:
    """The Python function of ``graph`` (``self`` its first argument), its source kept for tracebacks."""
    code = graph.python_code(root_module="self")
    filename = f"<stochdepth_kernels {name}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - fx's generated code
    return namespace["forward"]


def rewritten_code(block: nn.Module, forward_class: type, slots: set[str],
                   inserted: str | None = None) -> tuple[str, dict[str, Callable], list]:
    """What a rewritten block runs: the key of its code (sources), its methods by name (``forward``,
    each branch and its parameter list), and its tails."""
    graph = _traced(block, forward_class, inserted)
    branches, tails = _rewrite(graph, block, slots)
    methods = {"forward": with_extra_arguments(compile_graph(graph, f"{forward_class.__name__}.forward"), forward_class)}
    sources = [graph.python_code("self").src]
    for name, (branch, owners) in branches.items():
        methods[name] = compile_graph(branch, f"{forward_class.__name__}.{name}")
        methods[f"{name}_parameters"] = _parameters_of(owners)
        sources += [branch.python_code("self").src, repr(owners)]
    return "\n".join(sources), methods, [tail for tail, *_ in tails]


def _parameters_of(owners: tuple[str, ...]) -> Callable:
    def parameters(self) -> list[nn.Parameter]:
        found = []
        for value in (operator.attrgetter(owner)(self) for owner in owners):
            if isinstance(value, nn.Module):
                found += list(value.parameters())  # Dynamo 2.11 cannot trace list += generator
            elif isinstance(value, nn.Parameter):
                found.append(value)
        return found

    return parameters
