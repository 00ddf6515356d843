"""Tracing for structured shrink: torch.fx with nn modules and attention units as leaves.

:func:`trace_model` traces a model with :class:`ShrinkTracer`; a submodule whose
``forward`` torch.fx cannot trace (data-dependent control flow, iterating a tensor, ...)
is re-traced as an *opaque* leaf (at most :data:`MAX_OPAQUE`), and a failure in the root
``forward`` is a one-line :class:`UntraceableError` (a PrunelabError) naming the op and the source line.
:func:`propagate_shapes` runs ``ShapeProp`` on the example input in eval mode.
"""

from __future__ import annotations

import contextlib
import io
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import _get_qualified_name
from torch.fx.passes.shape_prop import ShapeProp

from prunelab.errors import PrunelabError

__all__ = ["MAX_OPAQUE", "ShrinkTracer", "UntraceableError", "as_inputs", "describe_target", "eval_mode",
           "is_attention_unit", "propagate_shapes", "trace_model"]

MAX_OPAQUE = 16  # at most this many untraceable submodules are turned into opaque leaves


class UntraceableError(PrunelabError):
    """The root ``forward`` cannot be traced; ``why`` is the cause alone (error, file, line) for other messages."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


def is_attention_unit(module: nn.Module) -> bool:
    """A self-attention unit shrink handles as a whole: Linear ``q_proj/k_proj/v_proj/out_proj`` + int ``num_heads``.

    Its forward must compute ``softmax(q k^T / sqrt(d)) v`` per head of ``head_dim =
    q_proj.out_features // num_heads`` channels and read ``self.num_heads`` at call time.
    """
    projections = [getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    heads = getattr(module, "num_heads", None)
    if not all(isinstance(p, nn.Linear) for p in projections) or isinstance(heads, bool) or not isinstance(heads, int):
        return False
    q, k, v, out = projections
    return heads > 0 and q.out_features == k.out_features == v.out_features == out.in_features and q.out_features % heads == 0


def describe_target(node: fx.Node, gm: fx.GraphModule) -> str:
    """``call_function torch.roll``, ``call_method .view()``, ``call_module LayerNorm 'ln'``."""
    if node.op == "call_function":
        return f"call_function {_get_qualified_name(node.target).replace('_operator.', 'operator.')}"
    if node.op == "call_method":
        return f"call_method .{node.target}()"
    if node.op == "call_module":
        return f"call_module {type(gm.get_submodule(node.target)).__name__} '{node.target}'"
    return f"{node.op} {node.target}"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode; restore each module's own flag afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def as_inputs(example_input: Any) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


class ShrinkTracer(fx.Tracer):
    """fx tracer whose leaves are torch.nn modules, attention units and ``opaque`` modules.

    Records the module path at the first failure so a trace error can name its module.
    Buffers read in a traced ``forward`` (``self.bn.running_mean``) become ``get_attr``
    nodes, as parameters do, instead of constants baked in at trace time, so a use of a
    cut layer's buffer outside its call can be found.
    """

    proxy_buffer_attributes = True

    def __init__(self, opaque: frozenset[str]) -> None:
        super().__init__()
        self.opaque = opaque
        self.stack: list[str] = []
        self.failed_in: list[str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.opaque or is_attention_unit(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            name = self.path_of_module(m)
        except NameError:
            name = f"<unregistered {type(m).__name__}>"
        self.stack.append(name)
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()
        return result


def _failure_site(exc: BaseException) -> str:
    """``file.py:12 `if x.sum() > 0:``` for the innermost frame outside torch."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    frames = [f for f in frames if not f.filename.endswith(("materialise/tracing.py", "materialise/graph.py"))]
    if not frames:
        return ""
    frame = frames[-1]
    code = f" `{frame.line.strip()}`" if frame.line else ""
    return f" at {Path(frame.filename).name}:{frame.lineno}{code}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def trace_model(model: nn.Module) -> tuple[fx.GraphModule, dict[str, str], dict[str, str]]:
    """Trace ``model``; untraceable submodules become opaque leaves.

    Returns the GraphModule, ``{opaque module FQN: why}`` and ``{node name: scope FQN}``;
    raises :class:`UntraceableError` when the root ``forward`` itself cannot be traced.
    """
    opaque: dict[str, str] = {}
    for _ in range(MAX_OPAQUE + 1):
        tracer = ShrinkTracer(frozenset(opaque))
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 -- user forward code may raise anything under tracing
            where = [p for p in (tracer.failed_in or []) if p]
            why = f"{_reason(exc)}{_failure_site(exc)}"
            if not where or where[-1] in opaque or where[-1].startswith("<") or len(opaque) >= MAX_OPAQUE:
                # a transformers model (its config has a model_type): heads have a route that needs no tracing
                heads = (" -- for attention heads, prunelab.heads.remove_heads_(model, choice.keep) cuts them "
                         "without tracing" if hasattr(getattr(model, "config", None), "model_type") else "")
                raise UntraceableError(
                    f"cannot trace {type(model).__name__} with torch.fx ({why}); structured shrink needs an fx-traceable "
                    "forward: move the data-dependent code into a submodule (shrink then keeps it whole; exclude the "
                    f"layers feeding it from pruning) or rewrite it without Python control flow on tensors{heads}", why
                ) from None
            opaque[where[-1]] = why
            continue
        scopes = {name: scope[0] for name, scope in tracer.node_name_to_scope.items()}
        return fx.GraphModule(tracer.root, graph, type(model).__name__), opaque, scopes
    raise AssertionError("unreachable")


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running (to name it when it fails)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def propagate_shapes(gm: fx.GraphModule, model: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Run ShapeProp in eval mode without gradients (BatchNorm statistics stay untouched).

    A failure is one line naming the node, its op and the model's own error.  (torch's
    ShapeProp prints a full traceback to stderr before re-raising; that print is silenced.)
    """
    prop = _ShapeProp(gm)
    try:
        with eval_mode(model), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(*inputs)
    except Exception as exc:  # noqa: BLE001 -- the user's model may raise anything on a bad input
        shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)
        node = prop.current
        where = f" at node '{node.name}', {describe_target(node, gm)}" if node is not None else ""
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc  # ShapeProp wraps the real error
        raise PrunelabError(
            f"the model cannot run example_input {shapes}{where} ({_reason(cause)}); pass an input the model "
            "accepts, e.g. one batch of its data"
        ) from None
