"""Weight sharing by k-means and centroid fine-tuning (Deep Compression, stage 2).

Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning,
Trained Quantization and Huffman Coding", ICLR 2016, Sec. 3.

Weight sharing.  The ``n`` kept weights ``W = {w_1..w_n}`` of ONE layer are partitioned
into ``k = 2^bits`` clusters ``C = {c_1..c_k}`` minimising the within-cluster sum of
squares (Eq. 1)::

    argmin_C  sum_{i=1..k} sum_{w in c_i} |w - c_i|^2

by Lloyd's algorithm in 1-D, started from LINEAR initialisation -- centroids evenly
spaced between ``min(W)`` and ``max(W)`` -- which the paper found best (Sec. 3.2, Fig. 4:
it keeps centroids on the few large weights that matter most).  Pruned weights (mask
False, or exactly zero) are not clustered and stay exactly zero.  A weight is assigned to
its nearest centroid, ties to the smaller one; an empty cluster keeps its centroid; the
iteration stops when no assignment changes (or after ``max_iter`` rounds).  Clusters
left empty are dropped from the codebook, so a codebook has *at most* ``2^bits`` entries.

Centroid fine-tuning (Sec. 3.3, Eq. 3).  All weights sharing a centroid receive one
update built from the gradients of its members::

    dL/dC_k = sum_{i,j} dL/dW_ij * 1(I_ij = k)

This implementation uses the cluster **average** ``dL/dC_k / n_k`` (``n_k`` = cluster
size) as the step direction, as the issue asked ("gradients averaged per cluster"): a
centroid then moves like a typical member weight would under plain SGD, whatever the
cluster size, so one learning rate suits every cluster and layer.  (The sum is the true
gradient of the loss with respect to ``C_k``; the average only rescales the step per
cluster.)  After every step the model's weights are exactly ``centroids[assignments]``.

Default bits follow the paper: 8 for convolutions, 5 for fully-connected layers
(Sec. 3, Table 2; its LeNet-300-100 row uses 6); ``transformers``' Conv1D (GPT-2) is a
fully-connected layer.  A ConvTranspose (a pruning target, :data:`prunelab.targets.PRUNABLE_TYPES`)
is a convolution for this purpose ("conv" bits): weight sharing is element-wise, so its
``(in, out/groups, *k)`` weight layout changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.oneshot.layer_targets import is_hf_conv1d

__all__ = ["DEFAULT_BITS", "MAX_BITS", "WEIGHT_DTYPES", "CentroidSGD", "Codebook", "attention_projections",
           "finetune_centroids", "kmeans_1d", "quantizable_layers", "quantize_model", "quantize_weight",
           "resolve_bits"]

DEFAULT_BITS = {"conv": 8, "fc": 5}
MAX_BITS = 16
# dtypes a quantised weight keeps (the file's dtype code is the index: do not reorder)
WEIGHT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_QUANTIZED_TYPES = (nn.Linear, *_CONV_TYPES)
_ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class Codebook:
    """One layer's shared weights: ``weight = centroids[assignments]``, 0 where ``assignments == -1``.

    ``centroids``: (K,) float32, K <= 2^bits, sorted ascending.
    ``assignments``: int64 of the weight's shape; cluster id, or -1 for a pruned weight.
    """

    centroids: torch.Tensor
    assignments: torch.Tensor
    bits: int

    @property
    def kept(self) -> int:
        return int((self.assignments >= 0).sum())

    def decode(self) -> torch.Tensor:
        """The quantised weight (float32, the assignments' shape)."""
        flat = self.assignments.reshape(-1)
        out = torch.zeros(flat.numel(), dtype=torch.float32)
        kept = flat >= 0
        out[kept] = self.centroids[flat[kept]]
        return out.reshape(self.assignments.shape)


def kmeans_1d(values: torch.Tensor, k: int, max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on a 1-D tensor with linear initialisation (Han et al. 2016, Sec. 3.2).

    Returns ``(centroids (k,) float32 sorted, assignments (n,) int64)``; all ``k`` centroids
    are returned, an empty cluster keeps its previous value.  Deterministic.  ``max_iter``
    (>= 1) bounds the Lloyd rounds (assign, then move each centroid to its cluster's mean).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PrunelabError(f"k-means needs k >= 1 clusters, got {k!r}; pass bits >= 0")
    _check_max_iter(max_iter)
    x = values.detach().reshape(-1).to(torch.float64).cpu()
    bad = int((~torch.isfinite(x)).sum())
    if bad:  # a NaN/inf min or max would make every linearly initialised centroid NaN
        raise PrunelabError(f"k-means got {bad} nan/inf value(s) among {x.numel()}; pass finite weights")
    if x.numel() == 0:
        return torch.zeros(k, dtype=torch.float32), torch.zeros(0, dtype=torch.int64)
    centroids = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)  # linear init
    assignments = None
    for _ in range(max_iter):
        centroids, _ = torch.sort(centroids)
        # nearest centroid in 1-D: cut at the midpoints; a value on a midpoint goes to the smaller centroid
        new = torch.bucketize(x, (centroids[1:] + centroids[:-1]) / 2, right=False)
        if assignments is not None and torch.equal(new, assignments):
            break
        assignments = new
        counts = torch.bincount(assignments, minlength=k).to(torch.float64)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assignments, x)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    # the final assignment is against the final (float32) centroids
    c32, _ = torch.sort(centroids.to(torch.float32))
    c64 = c32.to(torch.float64)
    assignments = torch.bucketize(x, (c64[1:] + c64[:-1]) / 2, right=False)
    return c32, assignments


def quantize_weight(weight: torch.Tensor, keep: torch.Tensor | None, bits: int, max_iter: int = 100, *,
                    name: str = "weight") -> Codebook:
    """Share the kept weights of one layer among at most ``2^bits`` float32 centroids.

    Kept = ``keep & (weight != 0)`` (``weight != 0`` without a mask).  If the kept weights
    already take at most ``2^bits`` distinct float32 values (an already-quantised layer,
    e.g. after :func:`finetune_centroids`), those values ARE the codebook and the layer is
    reproduced exactly; otherwise :func:`kmeans_1d` clusters them.  ``name`` only labels errors.
    A complex weight is refused (its imaginary part would be dropped).
    """
    _check_bits(bits, "bits")
    _check_max_iter(max_iter)
    if weight.is_complex():
        raise PrunelabError(f"{name!r} is complex ({weight.dtype}); weight sharing clusters real values -- "
                            "quantise a real-valued model")
    w = weight.detach().to(torch.float32).cpu()
    kept = w != 0
    if keep is not None:
        if tuple(keep.shape) != tuple(w.shape):  # `&=` would broadcast a (1, n) mask silently
            raise PrunelabError(f"mask for {name!r} has shape {tuple(keep.shape)} but the weight has "
                                f"{tuple(w.shape)}; pass the mask saved with this weight")
        kept &= keep.detach().to(torch.bool).cpu()
    flat_kept = kept.reshape(-1)
    values = w.reshape(-1)[flat_kept]
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise PrunelabError(f"{name!r} holds {bad} nan/inf value(s) among its kept weights; k-means needs finite "
                            "weights -- fix or re-train the model before quantising")
    distinct, inverse = torch.unique(values, sorted=True, return_inverse=True)
    if distinct.numel() <= 2**bits:
        centroids, ids = distinct, inverse
    else:
        centroids, ids = kmeans_1d(values, 2**bits, max_iter)
        used = torch.bincount(ids, minlength=centroids.numel()) > 0  # drop empty clusters
        remap = torch.cumsum(used.to(torch.int64), 0) - 1
        centroids, ids = centroids[used], remap[ids]
    assignments = torch.full((w.numel(),), -1, dtype=torch.int64)
    assignments[flat_kept] = ids
    return Codebook(centroids.to(torch.float32).contiguous(), assignments.reshape(w.shape), bits)


# --- which layers, how many bits ---------------------------------------------------------
def quantizable_layers(model: nn.Module) -> dict[str, str]:
    """``weight FQN -> "conv" | "fc"`` for every Linear/Conv/ConvTranspose layer of ``model``.

    Conv and ConvTranspose weights are ``"conv"``, Linear weights ``"fc"``.

    A ``transformers`` Conv1D (GPT-2's layers, found by type without importing transformers) is
    a fully-connected layer whose weight is stored ``(in, out)``: ``"fc"``.  Weight sharing is
    element-wise, so the layout changes nothing but the order the relative index walks.
    """
    out = {}
    for name, module in model.named_modules():
        linear_like = isinstance(module, _QUANTIZED_TYPES) or is_hf_conv1d(module)
        if linear_like and isinstance(getattr(module, "weight", None), torch.Tensor):
            out[f"{name}.weight" if name else "weight"] = "conv" if isinstance(module, _CONV_TYPES) else "fc"
    return out


def attention_projections(model: nn.Module) -> list[str]:
    """FQNs of every ``nn.MultiheadAttention`` input projection (``in_proj_weight`` or ``q/k/v_proj_weight``).

    They are pruning targets (:func:`prunelab.targets.prunable_parameters`) but no
    Linear/Conv module: the compressed file stores them raw (not weight-shared), with their
    mask applied, and their masks are accepted wherever a model's masks are.
    """
    out = []
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.MultiheadAttention):
            for attr in _ATTENTION_PROJECTIONS:
                if isinstance(getattr(module, attr, None), torch.Tensor):
                    out.append(f"{name}.{attr}" if name else attr)
    return out


def _check_max_iter(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunelabError(f"max_iter must be an integer >= 1 (Lloyd rounds of k-means), got {value!r}; e.g. 100")
    return value


def _check_bits(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BITS:
        raise PrunelabError(f"{what} must be an integer in [1, {MAX_BITS}], got {value!r}; the paper uses 5-8")
    return value


def resolve_bits(
    spec: int | Mapping[str, int] | None, layers: Mapping[str, str], defaults: Mapping[str, int], what: str = "bits"
) -> dict[str, int]:
    """Bits per weight FQN from ``spec``: an int for every layer, or a mapping.

    Mapping keys may be a weight FQN (``"fc1.weight"``), a module name (``"fc1"``) or a
    kind (``"conv"``, ``"fc"``); the most specific key wins; layers not named get
    ``defaults[kind]``.
    """
    if spec is None or isinstance(spec, int):
        if spec is not None:
            _check_bits(spec, what)
        return {n: spec if spec is not None else defaults[kind] for n, kind in layers.items()}
    if not isinstance(spec, Mapping):
        raise PrunelabError(f"{what} must be an int or a mapping name -> int, got {type(spec).__name__}; "
                            f"pass e.g. {{'fc': 5, 'conv': 8}}")
    modules = {n.removesuffix(".weight"): n for n in layers}
    for key, value in spec.items():
        _check_bits(value, f"{what}[{key!r}]")
        if key not in layers and key not in modules and key not in ("conv", "fc"):
            raise PrunelabError(
                f"{what} names {key!r}, which is no Linear/Conv/ConvTranspose layer; valid keys: 'conv', 'fc', "
                f"{', '.join(repr(m) for m in list(modules)[:6])}{'...' if len(modules) > 6 else ''}"
            )
    out = {}
    for name, kind in layers.items():
        module = name.removesuffix(".weight")
        out[name] = spec.get(name, spec.get(module, spec.get(kind, defaults[kind])))
    return out


def _layer_weights(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None, layers: Mapping[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None], dict[int, torch.Tensor]]:
    """Each layer's weight parameter and keep-mask (``None`` = no mask), both keyed by weight FQN,
    and the keep-masks of masked attention in-projections (stored raw), keyed by ``id(parameter)``.

    Parameters are looked up with ``remove_duplicate=False``, so a TIED weight (one tensor
    shared by two layers, or by an embedding and a Linear head) is found under every name,
    and a mask given under any of its names applies to every layer using it (several masks
    of one tensor are ANDed).  A layer weight of a dtype outside :data:`WEIGHT_DTYPES`
    (complex, float8) is refused: the file could not give it back in its dtype.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    for name in layers:
        if name not in named:
            raise PrunelabError(f"layer weight {name!r} is not a parameter of the model (a parametrization?); "
                                "remove it (torch.nn.utils.parametrize.remove_parametrizations) before compressing")
        if named[name].dtype not in WEIGHT_DTYPES:
            raise PrunelabError(
                f"layer weight {name!r} has dtype {named[name].dtype}; weight sharing keeps only "
                f"{', '.join(str(d).removeprefix('torch.') for d in WEIGHT_DTYPES)} weights -- convert the model "
                "first, e.g. model.float()")
    layer_ids = {id(named[n]) for n in layers}
    projection_ids = {id(named[n]) for n in attention_projections(model) if n in named}
    by_id: dict[int, torch.Tensor] = {}
    for name, mask in (masks or {}).items():
        param = named.get(name)
        if param is None or id(param) not in layer_ids | projection_ids:
            raise PrunelabError(
                f"mask {name!r} is not the weight of a Linear/Conv/ConvTranspose layer (or an nn.MultiheadAttention "
                f"input projection) of the model; valid names: "
                f"{', '.join(list(layers)[:6])}{'...' if len(layers) > 6 else ''} -- pass the masks of this model"
            )
        if tuple(mask.shape) != tuple(param.shape):
            raise PrunelabError(f"mask {name!r} has shape {tuple(mask.shape)} but the weight has "
                                f"{tuple(param.shape)}; pass the masks saved with this model")
        keep = mask.detach().to(device="cpu", dtype=torch.bool)
        by_id[id(param)] = keep if id(param) not in by_id else by_id[id(param)] & keep
    raw = {i: keep for i, keep in by_id.items() if i not in layer_ids}  # masked attention in-projections
    return {n: named[n] for n in layers}, {n: by_id.get(id(named[n])) for n in layers}, raw


def _in_dtype(book: Codebook, dtype: torch.dtype) -> Codebook:
    """``book`` with its centroids rounded to ``dtype`` (fp16/bf16 weights) and equal centroids merged.

    A half-precision weight cannot hold a float32 centroid; after rounding, the codebook
    decodes to exactly what the weight holds.
    """
    rounded = book.centroids.to(dtype).to(torch.float32)
    if torch.equal(rounded, book.centroids):
        return book
    centroids, inverse = torch.unique(rounded, sorted=True, return_inverse=True)  # rounding is monotone
    flat = book.assignments.reshape(-1)
    ids = torch.where(flat >= 0, inverse[flat.clamp(min=0)], flat)
    return Codebook(centroids.contiguous(), ids.reshape(book.assignments.shape), book.bits)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    bits: int | Mapping[str, int] | None = None,
    *,
    max_iter: int = 100,
) -> dict[str, Codebook]:
    """Weight-share every Linear/Conv/ConvTranspose weight of ``model`` IN PLACE; returns ``weight FQN -> Codebook``.

    ``bits``: int or mapping (see :func:`resolve_bits`; default 8 conv / 5 fc).  After the
    call each weight equals ``codebook.decode()`` exactly (an fp16/bf16 weight gets its
    centroids rounded to its dtype); pruned weights stay zero.  A tied weight (one tensor
    used by several layers) is quantised once, under the first layer's name and bits.
    An ``nn.MultiheadAttention`` input projection is not weight-shared (the file stores it
    raw); a mask given for it is applied (its pruned entries set to 0).
    """
    _check_max_iter(max_iter)
    layers = quantizable_layers(model)
    weights, keeps, raw_keeps = _layer_weights(model, masks, layers)
    per_layer = resolve_bits(bits, layers, DEFAULT_BITS)  # every check before the model changes
    for param in model.parameters():
        if id(param) in raw_keeps:
            param.masked_fill_(~raw_keeps[id(param)].to(param.device), 0)
    codebooks = {}
    done: set[int] = set()
    for name in layers:
        weight = weights[name]
        if id(weight) in done:
            continue
        done.add(id(weight))
        book = quantize_weight(weight, keeps[name], per_layer[name], max_iter, name=name)
        book = _in_dtype(book, weight.dtype)
        weight.copy_(book.decode().to(device=weight.device, dtype=weight.dtype))
        codebooks[name] = book
    return codebooks


# --- centroid fine-tuning ----------------------------------------------------------------
class CentroidSGD(torch.optim.Optimizer):
    """SGD on shared centroids (Han et al. 2016, Eq. 3, with cluster-AVERAGED gradients).

    ``params`` are the quantised weight tensors, ``codebooks`` their codebooks in the same
    order.  ``step()``: for each weight, ``g_k = mean_{I_ij = k} dL/dW_ij``;
    ``v_k = momentum * v_k + g_k``; ``c_k -= lr * v_k``; then ``W = c[I]`` on the kept
    entries (pruned entries are never written and stay zero).  Works with any LR scheduler.
    """

    def __init__(self, params: list[torch.Tensor], codebooks: list[Codebook], lr: float, momentum: float = 0.0) -> None:
        if len(params) != len(codebooks):
            raise PrunelabError(f"CentroidSGD got {len(params)} weights but {len(codebooks)} codebooks; pass one each")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise PrunelabError(f"CentroidSGD lr must be a positive number, got {lr!r}; e.g. 0.01")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise PrunelabError(f"CentroidSGD momentum must be in [0, 1), got {momentum!r}; e.g. 0.9")
        super().__init__(params, {"lr": lr, "momentum": momentum})
        for param, book in zip(params, codebooks):
            if tuple(param.shape) != tuple(book.assignments.shape):
                raise PrunelabError(f"codebook shape {tuple(book.assignments.shape)} does not match weight shape "
                                    f"{tuple(param.shape)}; pass the codebooks returned for this model")
            flat = book.assignments.reshape(-1).to(param.device)
            kept_idx = torch.nonzero(flat >= 0).reshape(-1)
            ids = flat[kept_idx]
            k = book.centroids.numel()
            self.state[param] = {
                "centroids": book.centroids.to(device=param.device, dtype=torch.float32).clone(),
                "kept_idx": kept_idx, "ids": ids, "bits": book.bits,
                "counts": torch.bincount(ids, minlength=k).clamp(min=1).to(torch.float32),
                "buffer": torch.zeros(k, dtype=torch.float32, device=param.device),
            }

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 -- see class docstring
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                grad = param.grad.reshape(-1)[state["kept_idx"]].to(torch.float32)          # (n_kept,)
                sums = torch.zeros_like(state["centroids"]).index_add_(0, state["ids"], grad)  # (K,)
                buffer = state["buffer"].mul_(group["momentum"]).add_(sums / state["counts"])
                state["centroids"].sub_(group["lr"] * buffer)
                values = state["centroids"][state["ids"]].to(param.dtype)
                if param.is_contiguous():
                    param.view(-1)[state["kept_idx"]] = values
                else:  # e.g. a transposed weight: view(-1) is impossible, write through a flat copy
                    flat = param.detach().reshape(-1).clone()
                    flat[state["kept_idx"]] = values
                    param.copy_(flat.view(param.shape))
        return loss

    def codebooks(self) -> list[Codebook]:
        """The current codebooks (copies), in parameter order.

        Centroids are rounded to the weight's dtype (the float32 state is the master copy of
        an fp16/bf16 weight), so ``codebook.decode()`` equals the weight exactly.
        """
        out = []
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                assignments = torch.full((param.numel(),), -1, dtype=torch.int64)
                assignments[state["kept_idx"].cpu()] = state["ids"].cpu()
                centroids = state["centroids"].detach().to(param.dtype).to(torch.float32).cpu().clone()
                out.append(Codebook(centroids, assignments.reshape(param.shape), state["bits"]))
        return out


def finetune_centroids(
    model: nn.Module,
    codebooks: Mapping[str, Codebook],
    train_loader,
    epochs: int,
    lr: float,
    *,
    momentum: float = 0.9,
    lr_schedule: str = "cosine",
    seed: int = 0,
    progress: bool = False,
    loss_fn=F.cross_entropy,
    lr_flag: str = "--lr",
) -> dict[str, Codebook]:
    """Fine-tune the shared centroids of ``model`` with prunelab's training engine; returns new codebooks.

    Only the centroids learn (Han et al. 2016, Sec. 3.3): every other parameter is frozen
    for the run (``requires_grad`` restored afterwards); the assignments never change.
    Each centroid steps along the cluster-AVERAGED gradient of its weights
    (:class:`CentroidSGD`), not the paper's Eq. 3 sum: ``lr`` acts like a per-weight SGD rate.
    ``model``'s weights must equal ``codebooks[name].decode()`` (as :func:`quantize_model`
    leaves them) and, after every optimizer step, equal the updated centroids exactly.

    The paper's centroid fine-tuning is a *retraining* of the shared weights -- ordinary
    training whose gradients are grouped by cluster -- so the model runs in training mode:
    dropout is active and BatchNorm normalises by batch statistics and updates its running
    mean/variance (buffers, not learned parameters; its affine weight and bias stay frozen).
    That is deliberate: quantisation moved the weights, and the running statistics are
    re-estimated for the quantised network that is then written to the file (buffers are
    stored raw).  To keep them, freeze those BatchNorm layers in eval mode under a train-mode
    model (:func:`prunelab.bench.training.train` leaves such a freeze alone) or put their
    ``momentum`` to 0 first.  ``lr_flag`` names the learning-rate option in the error a
    diverging loss raises (``--finetune-lr`` for ``prunelab compress``).  Every
    submodule's own train/eval flag is restored afterwards (also on an error).
    """
    from prunelab.bench.training import TrainConfig, train

    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under any of its names
    names = list(codebooks)
    for name in names:
        if name not in params:
            raise PrunelabError(f"codebook {name!r} names no parameter of the model; pass the codebooks "
                                f"quantize_model returned for this model")
        decoded = codebooks[name].decode()
        weight = params[name].detach().to(torch.float32).cpu()
        if decoded.shape != weight.shape or not torch.equal(decoded, weight):
            raise PrunelabError(f"weight {name!r} differs from its codebook; run quantize_model on this model "
                                f"first and pass the codebooks it returned")
    if not names:  # no Linear/Conv layer: no centroid to tune (an empty optimizer would be an error)
        return {}
    targets = {id(params[n]) for n in names}
    if len(targets) != len(names):
        raise PrunelabError(f"the codebooks {names} name one tied weight more than once; pass one codebook per "
                            "tensor, as quantize_model returns them")
    cfg = TrainConfig(epochs=epochs, batch_size=getattr(train_loader, "batch_size", None) or 1, lr=lr,
                      momentum=momentum, lr_schedule=lr_schedule, seed=seed, progress=progress)
    optimizer = CentroidSGD([params[n] for n in names], [codebooks[n] for n in names], lr=lr, momentum=momentum)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(module, module.training) for module in model.modules()]  # mixed modes (a frozen BatchNorm) too
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in targets)
        train(model, train_loader, cfg, optimizer=optimizer, loss_fn=loss_fn, description="centroids",
              lr_flag=lr_flag)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            if id(p) in targets:
                p.grad = None
        for module, training in modes:  # parents first: each call sets a subtree, so the children's flags win
            module.train(training)
    return dict(zip(names, optimizer.codebooks()))
