"""Pruning-at-initialisation criteria: SNIP, GraSP and SynFlow.

All three are meant to score a network *before* training (typically at its fresh
initialisation) and are computed on the network exactly as given.  They follow the
criterion contract of :mod:`prunelab.criteria.base`: pure (gradients by
``torch.autograd.grad`` on detached aliases, never ``.backward()``), eval mode, float32
scores, **higher = keep**.

==========  ==========================================  ====================================
name        score (higher = keep)                       paper
==========  ==========================================  ====================================
snip        |g ⊙ w| / sum |g ⊙ w|,  g = dL/dw           Lee et al. 2019
grasp       w ⊙ (H g)   (= -S of the paper)             Wang et al. 2020
synflow     |w| ⊙ dR/d|w|,  R = 1^T (prod_l |W_l|) 1    Tanaka et al. 2020 (data-free)
==========  ==========================================  ====================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from prunelab import distributed
from prunelab.criteria.base import (
    Criterion, FunctionalModel, ScoreData, batch_errors, batch_loss, batches_over_ranks, eval_mode, iter_batches,
    leaves,
)
from prunelab.errors import PrunelabError


def loss_gradients(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    data: ScoreData,
    weights: Mapping[str, Tensor] | None = None,
    *,
    criterion: str = "snip",
) -> dict[str, Tensor]:
    """Mean over the batches of ``data`` of ``dL_b/dw`` for every parameter in ``params``::

        g = (1/B) sum_{b=1..B} dL_b/dw        (B batches; under torch.distributed, of every rank)

    ``weights`` (optional, keyed like ``params``) replaces the parameters in the forward
    pass, so the gradient is taken *at* those values (FORCE evaluates it at the masked
    weights ``theta ⊙ m``).  Pure: eval mode, ``.grad`` untouched.  Parameters the loss
    does not reach get a zero gradient.  Returns float64 tensors.  ``criterion`` names the
    caller in the one-line PrunelabError for a batch the model or ``loss_fn`` cannot take.

    Under ``torch.distributed`` the mean runs over the batches of every rank (the sums and
    the batch count are all-reduced), so the gradient -- and whatever is decided from it
    after a non-linear step such as SNIP's ``|w g|`` -- is the same on every rank and equals
    one process's on all the batches (DESIGN.md decision 3); a rank with no batches adds
    nothing.  A bad batch or a non-scalar loss on one rank raises the same PrunelabError on
    every rank (none is left waiting in the all-reduce).  Every rank must call it.
    """
    with eval_mode(model), torch.enable_grad():
        forward = FunctionalModel(model, params)
        base = {n: (weights[n] if weights is not None else p) for n, p in params.items()}
        totals = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()}
        num_batches = 0
        with distributed.errors_on_every_rank():  # one rank's bad batch: every rank raises, none waits below
            for inputs, targets in iter_batches(data, forward.device, allow_empty=True):
                tensors = leaves(base)  # detached aliases that require grad
                with batch_errors(criterion, inputs, targets):
                    loss = batch_loss(data, forward(tensors, inputs), targets)
                    grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
                for name, grad in zip(tensors, grads):
                    if grad is not None:
                        totals[name] += grad.double()
                num_batches += 1
    return _mean_over_ranks(totals, num_batches)


def _count_over_ranks(count: int) -> int:
    """``sum_r count_r``, exact (an integer all-reduce; ``count`` for a single process); the
    same "no batches" PrunelabError on every rank when it is 0 (:func:`batches_over_ranks`)."""
    return batches_over_ranks(count)


def _mean_over_ranks(totals: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    """``sum_r totals_r / sum_r count_r`` per tensor: a mean over the batches of all ranks
    (``totals / count`` for a single process)."""
    total = _count_over_ranks(count)
    return {n: distributed.all_reduce_sum_(t) / total for n, t in totals.items()}


def _means_over_ranks_(means: dict[str, Tensor], count: int) -> None:
    """In place: each rank's mean over its ``count`` batches -> the mean over the batches of all
    ranks, ``sum_r (count_r / N) mean_r`` with ``N = sum_r count_r`` (a factor 1.0, exact, for a
    single process)."""
    total = _count_over_ranks(count)
    for mean in means.values():
        distributed.all_reduce_sum_(mean.mul_(count / total))


@dataclass(frozen=True)
class SNIP(Criterion):
    """SNIP connection sensitivity (Lee, Ajanthan & Torr 2019, "SNIP: Single-shot Network
    Pruning based on Connection Sensitivity")::

        s_j = |g_j| / sum_k |g_k|,    g_j = dL(c ⊙ w)/dc_j at c = 1  =  w_j * dL/dw_j

    ``L`` is ``data.loss_fn`` and ``dL/dw`` the **mean over the batches** of the
    per-batch gradients (for equal-size batches, the gradient of the loss on their union;
    the paper uses one mini-batch: pass ``ScoreData(loader, max_batches=1)``; under
    ``torch.distributed``, over the batches of every rank: :func:`loss_gradients`).  Unlike ``taylor``
    (mean of per-batch absolute values), the absolute value is taken after averaging.
    The normalising sum runs over every scored parameter (it does not change any
    ranking).  Groups: the default sum.
    """

    name = "snip"
    needs_data = True

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        assert data is not None
        grads = loss_gradients(model, params, data, criterion=self.name)
        raw = {n: (params[n].detach().double() * grads[n]).abs() for n in params}
        total = sum(float(r.sum()) for r in raw.values())
        return {n: r / total if total > 0 else r for n, r in raw.items()}


@dataclass(frozen=True)
class GraSP(Criterion):
    """Gradient Signal Preservation (Wang, Zhang & Grosse 2020, "Picking Winning Tickets
    Before Training by Preserving Gradient Flow")::

        S(-w) = -w ⊙ H g,        g = dL/dw,   H = d^2 L / dw^2

    GraSP removes the weights with the **highest** ``S`` (their removal reduces the
    gradient norm ``g^T g`` least, or even raises it).  prunelab's convention is higher =
    keep, so this criterion returns ``-S = w ⊙ H g``: "keep" is exactly what GraSP keeps.
    Scores are signed (negative values are the first to go); use the ``global``,
    ``uniform`` or ``erk`` allocation (``lamp`` squares scores and loses the sign).

    Computation (double backprop, as the authors' release): pass 1 averages
    ``g = (1/B) sum_b dL_b/dw`` over the batches and detaches it; pass 2 computes
    ``H g = d/dw [ (1/B) sum_b stopgrad(g)^T dL_b/dw ]`` with ``create_graph=True``, on
    **the same batches** as pass 1 (cached once; ``data.max_batches`` bounds the memory).
    ``L_b = loss_fn(outputs / temperature, targets)``; the authors' code divides logits by
    ``T = 200`` (the default here), ``temperature=1`` is the plain loss.  ``g`` and ``H``
    are taken over the scored parameters only.  Under ``torch.distributed`` both means run
    over the batches of every rank (all-reduced, weighted by each rank's batch count), so
    every rank scores ``w ⊙ H g`` of all the data (DESIGN.md decision 3); a rank with no
    batches adds nothing, and a bad batch or a non-scalar loss on one rank raises the same
    PrunelabError on every rank.
    """

    temperature: float = 200.0
    name = "grasp"
    needs_data = True

    def __post_init__(self) -> None:
        value = self.temperature
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise PrunelabError(
                f"criterion 'grasp' got temperature={value!r}; expected a positive number (the authors use 200)"
            )

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        assert data is not None
        forward = FunctionalModel(model, params)

        def loss_of(tensors: Mapping[str, Tensor], inputs: Tensor, targets: Tensor) -> Tensor:
            return batch_loss(data, forward(tensors, inputs) / self.temperature, targets)

        # pass 1: g = mean_b dL_b/dw, detached
        g = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        with distributed.errors_on_every_rank():  # one rank's bad batch: every rank raises, none waits below
            batches = list(iter_batches(data, forward.device, allow_empty=True))
            for inputs, targets in batches:
                tensors = leaves(params)
                with batch_errors(self.name, inputs, targets):
                    grads = torch.autograd.grad(loss_of(tensors, inputs, targets), list(tensors.values()),
                                                allow_unused=True)
                for name, grad in zip(tensors, grads):
                    if grad is not None:
                        g[name] += grad.float() / len(batches)
        _means_over_ranks_(g, len(batches))  # under DDP: g over the batches of every rank
        # pass 2: Hg = d/dw (stopgrad(g)^T mean_b dL_b/dw)
        hg = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        with distributed.errors_on_every_rank():
            for inputs, targets in batches:
                with batch_errors(self.name, inputs, targets):
                    products = _hessian_times(g, forward, params, lambda t: loss_of(t, inputs, targets))
                for name, product in products.items():
                    hg[name] += product.float() / len(batches)
        _means_over_ranks_(hg, len(batches))  # H g with H over the batches of every rank
        return {n: params[n].detach().float() * hg[n] for n in params}


def _hessian_times(
    g: Mapping[str, Tensor], forward: FunctionalModel, params: Mapping[str, nn.Parameter],
    loss_of: Callable[[Mapping[str, Tensor]], Tensor],
) -> dict[str, Tensor]:
    """``H_b g = d/dw (stopgrad(g)^T dL_b/dw)`` of one batch's loss ``loss_of(weights)``, per
    parameter it reaches (``{}`` when the loss is at most linear in every scored weight: ``H g = 0``)."""
    tensors = leaves(params)
    grads = torch.autograd.grad(loss_of(tensors), list(tensors.values()), create_graph=True, allow_unused=True)
    inner = sum(  # tied FQNs share one leaf: count each parameter once
        (gr * g[n].to(gr.dtype)).sum()
        for n, gr in zip(tensors, grads)
        if gr is not None and forward.representative[n] == n
    )
    if not isinstance(inner, Tensor) or not inner.requires_grad:
        return {}
    products = torch.autograd.grad(inner, list(tensors.values()), allow_unused=True)
    return {name: product for name, product in zip(tensors, products) if product is not None}


def _positive_shape(shape: object) -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        dims = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        dims = ()
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise PrunelabError(
            f"criterion 'synflow' got input_shape={shape!r}; expected one sample's shape as positive ints "
            "without the batch dimension, e.g. (1, 28, 28)"
        )
    return dims


def _failing_layer(module: nn.Module, exc: BaseException) -> str:
    """`` in layer 'fc1' (Linear)``: the innermost submodule of ``module`` whose ``forward`` the
    traceback of ``exc`` passes through ("" when none does)."""
    names = {id(m): name for name, m in module.named_modules()}
    found = ""
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            name = names[id(owner)]
            found = f" in layer {name!r} ({type(owner).__name__})" if name else f" in the model's forward ({type(owner).__name__})"
        tb = tb.tb_next
    return found


def running_statistics(module: nn.Module) -> set[str]:
    """FQNs (inside ``module``) of the ``running_mean`` / ``running_var`` buffers of its batch /
    instance norm layers: the buffers SynFlow linearises with the parameters."""
    names: set[str] = set()
    for prefix, norm in module.named_modules():
        if isinstance(norm, _NormBase):
            for attr in ("running_mean", "running_var"):
                if getattr(norm, attr, None) is not None:
                    names.add(f"{prefix}.{attr}" if prefix else attr)
    return names


@dataclass(frozen=True)
class SynFlow(Criterion):
    """Iterative Synaptic Flow score, one round (Tanaka, Kunin, Yamins & Ganguli 2020,
    "Pruning neural networks without any data by iteratively conserving synaptic flow",
    Algorithm 1)::

        R = 1^T ( prod_l |W_l| ) 1,        s = |W| ⊙ dR/d|W|

    Data-free: every parameter and every normalisation layer's running statistics
    (``running_mean`` / ``running_var``, see :func:`running_statistics`) are replaced by
    their absolute values (on temporary float64 copies; the model is untouched), the input
    is all ones, and ``R`` is the sum of the outputs.  Other buffers are not weights of the
    flow: they are used as they are (cast to float64), so a causal mask filled with
    ``-inf`` (added to attention logits) or a bool mask keeps masking.  Tanaka et al.'s code
    takes ``abs()`` of every ``state_dict`` entry, which turns such a ``-inf`` mask into
    ``+inf`` (their networks hold no other buffers); on networks whose only buffers are
    batch-norm statistics both are the same.  For a bias-free ReLU network all pre-activations are then
    positive, the network is linear and ``R`` is the total path weight; the scores of
    each layer then sum to ``R`` (Tanaka et al.'s network-wise conservation).  Biases and
    batch-norm parameters enter as the authors' code does (their absolute values).
    The model runs in eval mode (batch norm on its |running statistics|, no dropout).

    Input shape: ``input_shape`` if given (one sample, no batch dimension), else the
    shape of the first batch of ``data`` when data is passed (only its shape is used:
    the scores do not depend on the data), else ``(in_features,)`` when the model's first
    module with parameters is an ``nn.Linear``; otherwise a PrunelabError asks for
    ``input_shape``.  Under ``torch.distributed`` each rank takes it from its own first batch; a rank
    whose ScoreData is empty or unbatched raises the same PrunelabError on every rank.

    Numerics: the forward/backward runs in **float64** (products over many layers
    overflow float32), and the scores are divided by their maximum over all scored
    parameters (a positive constant: no ranking changes) before the float32 cast, so
    they lie in [0, 1].  An ``R`` outside float64's normal range (not finite, or so small
    that it is subnormal and has lost its digits) or a non-finite score raises
    PrunelabError; so does a forward pass that fails on the all-ones input, naming the
    layer it failed in.  A scored parameter
    that gets no gradient at all (not on a path from the input to the output) raises
    PrunelabError naming it; a zero gradient (e.g. behind a fully pruned layer) scores 0.
    Operations that break positivity (a softmax inside the model, subtractions) make the
    score a heuristic rather than path weight -- Tanaka et al. assume ReLU networks.
    """

    input_shape: tuple[int, ...] | None = None
    name = "synflow"
    needs_data = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", _positive_shape(self.input_shape))

    def resolve_input_shape(self, model: nn.Module, data: ScoreData | None) -> tuple[int, ...]:
        """The one-sample input shape used for the all-ones input (see the class docstring)."""
        if self.input_shape is not None:
            return self.input_shape
        if data is not None:
            # an empty or unbatched first batch on one rank: every rank raises (none waits in the Sparsifier's all-reduce)
            with distributed.errors_on_every_rank():
                with torch.random.fork_rng(devices=[]):  # a DataLoader iterator draws its seed from the global generator
                    inputs, _ = next(iter_batches(data, torch.device("cpu")))
                if not isinstance(inputs, Tensor) or inputs.dim() < 2:
                    raise PrunelabError(
                        "criterion 'synflow' takes the input shape from the first ScoreData batch, but its inputs are "
                        f"not a batched tensor ({type(inputs).__name__}); pass input_shape=(...) instead"
                    )
            return tuple(int(d) for d in inputs.shape[1:])
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        first = next((m for m in module.modules() if any(True for _ in m.parameters(recurse=False))), None)
        if isinstance(first, nn.Linear):
            return (first.in_features,)
        raise PrunelabError(
            "criterion 'synflow' needs the model's input shape and cannot infer it (the first layer is "
            f"{type(first).__name__ if first is not None else 'missing'}, not nn.Linear); pass "
            "get_criterion('synflow', input_shape=(C, H, W)) or ScoreData with one batch of inputs"
        )

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        shape = self.resolve_input_shape(model, data)
        forward = FunctionalModel(model, params)
        module = forward.module
        with eval_mode(model), torch.enable_grad():
            tensors: dict[str, Tensor] = {}
            canonical: dict[int, str] = {}  # id(parameter) -> its first FQN (the one named_parameters gives)
            statistics = running_statistics(module)
            for local, p in module.named_parameters():
                tensors[local] = p.detach().double().abs()
                canonical[id(p)] = local
            for local, b in module.named_buffers():
                if b.is_floating_point():  # in float64 like the rest; bool / int buffers are left as they are
                    tensors[local] = b.detach().double()
                    if local in statistics:
                        tensors[local] = tensors[local].abs()
            own = dict(module.named_parameters(remove_duplicate=False))
            # a tied weight's alias (e.g. lm_head.weight tied to the embedding) is scored as the shared tensor
            scored = {name: canonical[id(own[forward.local[name]])] for name in params}
            for local in scored.values():
                tensors[local].requires_grad_(True)
            ones = torch.ones((1, *shape), dtype=torch.float64, device=forward.device)  # (1, *input_shape)
            try:
                outputs = torch.func.functional_call(module, tensors, (ones,))
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise PrunelabError(
                    f"criterion 'synflow' could not run the model on an all-ones input of shape {(1, *shape)}"
                    f"{_failing_layer(module, exc)} ({first_line}); pass the right input_shape=(...) without the "
                    "batch dimension (SynFlow feeds float64 ones through the whole model, so a layer that needs "
                    "integer indices, such as an embedding, cannot be scored by it)"
                ) from None
            if not isinstance(outputs, Tensor):
                raise PrunelabError(
                    f"criterion 'synflow' needs a model returning one tensor, got {type(outputs).__name__}; "
                    "wrap the model so forward returns the logits"
                )
            flow = outputs.sum()  # R = 1^T (prod_l |W_l|) 1
            if not torch.isfinite(flow) or 0 < abs(float(flow.detach())) < torch.finfo(torch.float64).tiny:
                raise PrunelabError(
                    f"criterion 'synflow': the synaptic flow R = {float(flow.detach())} is out of float64's range (not "
                    "finite, or below its smallest normal number); the network is too deep or its weights too large "
                    "(or too small) for the all-ones input -- rescale the initialisation"
                )
            locals_ = list(scored.values())
            grads = torch.autograd.grad(flow, [tensors[l] for l in locals_], allow_unused=True)
        missing = [name for name, grad in zip(scored, grads) if grad is None]
        if missing:
            raise PrunelabError(
                f"criterion 'synflow' cannot score {', '.join(missing)}: no gradient reaches them from the all-ones "
                "input (not on a path from input to output); exclude them from pruning (--exclude)"
            )
        raw = {name: (tensors[scored[name]].detach() * grad).abs() for name, grad in zip(scored, grads)}
        overflow = [name for name, r in raw.items() if not bool(torch.isfinite(r).all())]
        if overflow:  # R is finite but dR/dw overflowed (e.g. tiny first-layer weights before huge later ones)
            raise PrunelabError(
                f"criterion 'synflow': the scores of {', '.join(overflow)} overflow float64 although R = {float(flow.detach())} "
                "is finite; rescale the initialisation (the weights of some layers are far too large)"
            )
        peak = max(float(r.max()) if r.numel() else 0.0 for r in raw.values())
        return {n: r / peak if peak > 0 else r for n, r in raw.items()}
