"""Materialise: turn a masked model into one that is really smaller or faster.

    new = materialise(model, "auto", masks=masks, example_input=x[:1])
    print(new.materialise_report.table())

Forms (``from prunelab.materialise import FORMS``; ``FORMS.names()``):

=========  ================================================================================
shrink     physically smaller dense layers (structured masks), ``shrink.shrink_model``
csr        every Linear (and groups=1 Conv2d, via im2col) as a CSR matrix (MKL sparse BLAS)
bsr        every Linear whose shape the block tiles as BSR (``block_size``, default 4x4)
2:4        every Linear in NVIDIA's 2:4 compressed form (sparse tensor cores on sm80+ CUDA;
           elsewhere a dense fallback, with a warning)
auto       each layer's kernel measured (:func:`~prunelab.materialise.autotune.choose_kernels`)
           at ``batch_sizes``; a sparse kernel is used only where it is no slower than dense
=========  ================================================================================

The returned model is a NEW module (a deep copy, in eval mode); ``model`` is untouched.
``masks`` (FQN -> bool keep-mask) are applied to the copy first; without them the zeros
already in the weights are the sparsity, and every Linear/Conv layer is a target (with
masks: the layers they name); ``shrink`` also cuts each ConvTranspose's whole zero output
channels ``weight[:, o]``.  DESIGN.md decision 5: before returning, the new model is
run on ``example_input`` next to the masked model; if the max abs difference exceeds
``tolerance`` x the largest reference output magnitude (at least 1, as in
``shrink_model``), :class:`PrunelabError` is raised.  The numbers go to ``new.materialise_report`` (a :class:`MaterialiseReport`).

``transformers``' Conv1D (GPT-2's layers, ``y = x W + b`` with ``W`` stored ``(in, out)``) is a
Linear here: it is swapped for the sparse Linear of ``W^T`` (its 2:4 groups run along ``W``'s
dim 0, the input).  A mask on a parameter no sparse kernel takes (an embedding, a convolution
under ``bsr``, ...) is applied as zeros, and a one-line ``UserWarning`` names it.

``pooling="auto"`` also swaps each ``nn.MaxPool2d`` for an exact, faster separable pool
where measured no slower (:mod:`prunelab.materialise.pooling`).

Saving: ``torch.save(new.state_dict(), path)``; load with
:func:`~prunelab.materialise.sparse_modules.load_materialised` (``dense_arch, state_dict``).
A ``transformers`` model's ``new.save_pretrained(folder)`` works too (see
:func:`~prunelab.materialise.sparse_modules.route_save_pretrained`); reload that folder with
``load_materialised(AutoModel...from_config(config), safetensors.torch.load_file(...))``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.materialise.autotune import KernelReport, Timer, choose_kernels
from prunelab.materialise.formats import block_shape
from prunelab.materialise.pooling import PoolingReport, speed_up_pooling_
from prunelab.materialise.sparse_modules import (
    SparseModule, build_sparse, is_hf_conv1d, kernel_unavailable_reason, load_materialised, route_save_pretrained,
    semi_structured_available,
)
from prunelab.measure.tables import markdown_table
from prunelab.registry import Registry

__all__ = ["FORMS", "LayerForm", "MaterialiseReport", "load_materialised", "materialise"]

TARGET_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # + transformers' Conv1D
# shrink (only) also cuts these; no sparse kernel takes them
_CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
POOLING: tuple[str, ...] = ("native", "auto")  # materialise(pooling=...)


@dataclass(frozen=True)
class LayerForm:
    """How one layer was materialised."""

    name: str
    kind: str
    kernel: str          # "dense", "csr", "bsr", "2:4"
    sparsity: float
    dense_bytes: int     # weight + bias, fp32 dense
    stored_bytes: int    # what the materialised layer stores
    note: str = ""       # why it stayed dense, or a fallback


@dataclass(frozen=True)
class MaterialiseReport:
    """What ``materialise`` did and how closely the result matches the masked model."""

    form: str
    layers: tuple[LayerForm, ...]
    max_abs_error: float
    output_scale: float          # max |reference output|
    tolerance: float
    kernels: KernelReport | None = None  # the autotune measurements (form "auto")
    notes: tuple[str, ...] = field(default_factory=tuple)
    pools: PoolingReport | None = None   # the max-pool measurements (pooling="auto")

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / self.output_scale if self.output_scale else self.max_abs_error

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer; sizes in KB = bytes / 1000, the convention of prune's report and measure.tables."""
        return [{"layer": l.name, "kind": l.kind, "kernel": l.kernel, "sparsity_pct": 100 * l.sparsity,
                 "dense_kb": l.dense_bytes / 1000, "stored_kb": l.stored_bytes / 1000, "note": l.note}
                for l in self.layers]

    def table(self) -> str:
        columns = (("layer", "layer"), ("kind", "kind"), ("kernel", "kernel"), ("sparsity_pct", "sparsity %"),
                   ("dense_kb", "dense KB"), ("stored_kb", "stored KB"), ("note", "note"))
        text = markdown_table(self.rows(), columns) if self.layers else "(no per-layer forms)"
        if self.pools is not None:
            text += f"\n\nmax pools (pooling='auto'):\n{self.pools.table()}"
        return f"{text}\n\nmax abs error {self.max_abs_error:.3g} (relative {self.relative_error:.3g}, allowed {self.tolerance:g})"


@dataclass(frozen=True)
class _Request:
    """Everything a form builder needs besides the model copy."""

    targets: tuple[str, ...]
    masks: Mapping[str, torch.Tensor] | None
    example_input: torch.Tensor
    timer: Timer | None
    batch_sizes: tuple[int, ...]
    block_size: tuple[int, int]
    candidates: tuple[str, ...] | None


FormBuilder = Callable[[nn.Module, _Request], tuple[nn.Module, list[LayerForm], KernelReport | None, list[str]]]
FORMS: Registry[FormBuilder] = Registry("materialise form")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _layer_form(name: str, original: nn.Module, new: nn.Module, kernel: str, note: str = "") -> LayerForm:
    weight = original.weight.detach()
    bias = 0 if getattr(original, "bias", None) is None else original.bias.numel()
    dense_bytes = 4 * (weight.numel() + bias)
    stored = new.nbytes if isinstance(new, SparseModule) else dense_bytes
    sparsity = float((weight == 0).sum()) / weight.numel() if weight.numel() else 0.0
    return LayerForm(name, type(original).__name__, kernel, sparsity, dense_bytes, stored, note)


def _swap(model: nn.Module, request: _Request, kernel_of: Callable[[str, nn.Module], tuple[str, str]]) -> list[LayerForm]:
    """Replace each target by its kernel's module; ``kernel_of(name, module) -> (kernel, note)``."""
    forms = []
    uses = _uses(model)
    for name in request.targets:
        module = model.get_submodule(name)
        reader = _shared_reader(model, uses.get(name, (name,)))
        if reader:  # the parent uses `.weight` itself, not the layer's forward: a swap would break it
            kernel, note = "dense", f"kept dense: {reader} reads this layer's weight directly"
        else:
            kernel, note = kernel_of(name, module)
        new = build_sparse(module, kernel, name=f"{name}.weight", block_size=request.block_size)
        if new is not module:  # at every use of a shared layer, so the tie holds
            for alias in uses.get(name, (name,)):
                _set_submodule(model, alias, new)
        forms.append(_layer_form(name, module, new, kernel, note))
    return forms


def _weight_reader(model: nn.Module, name: str) -> str:
    """The parent module type that reads layer ``name``'s weight tensor directly ("" if none).

    ``nn.MultiheadAttention`` passes ``out_proj.weight``/``.bias`` to
    ``F.multi_head_attention_forward`` instead of calling ``out_proj``, and
    ``nn.TransformerEncoderLayer`` (and the ``nn.TransformerEncoder`` around it) reads
    ``linear1.weight``/``linear2.weight`` to decide on its fused fast path; a sparse module
    there (no ``.weight``) would fail with an AttributeError.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        return type(parent).__name__
    if isinstance(parent, nn.TransformerEncoderLayer) and child in ("linear1", "linear2"):
        return type(parent).__name__
    return ""


def _fixed_kernel(kernel: str, request: _Request) -> Callable[[str, nn.Module], tuple[str, str]]:
    def kernel_of(name: str, module: nn.Module) -> tuple[str, str]:
        if kernel == "2:4" and (isinstance(module, nn.Linear) or is_hf_conv1d(module)):
            return kernel, ""  # a weight that breaks the pattern must raise, not silently stay dense
        reason = kernel_unavailable_reason(module, kernel, block_size=request.block_size)
        return ("dense", f"kept dense: {reason}") if reason else (kernel, "")
    return kernel_of


@FORMS.register("csr", "every Linear (and groups=1 Conv2d via im2col) as CSR, int32 indices (MKL sparse BLAS on CPU)")
def _form_csr(model: nn.Module, request: _Request):
    return model, _swap(model, request, _fixed_kernel("csr", request)), None, []


@FORMS.register("bsr", "every Linear as block sparse rows (block_size, default 4x4); convolutions stay dense")
def _form_bsr(model: nn.Module, request: _Request):
    return model, _swap(model, request, _fixed_kernel("bsr", request)), None, []


@FORMS.register("2:4", "NVIDIA 2:4 compressed Linear weights: sparse tensor cores on sm80+ CUDA, else dense fallback")
def _form_24(model: nn.Module, request: _Request):
    forms = _swap(model, request, _fixed_kernel("2:4", request))
    slow = [f.name for f in forms if f.kernel == "2:4"
            and not model.get_submodule(f.name).accelerated]  # type: ignore[union-attr]
    notes = []
    if slow:
        device = next(model.get_submodule(slow[0]).buffers()).device
        notes.append(
            f"2:4 kernels need an NVIDIA Ampere or newer GPU (compute capability >= 8.0); on {device} "
            f"layer(s) {', '.join(slow)} fall back to dense matmul (same speed as dense, smaller storage)"
        )
        forms = [LayerForm(f.name, f.kind, f.kernel, f.sparsity, f.dense_bytes, f.stored_bytes, "dense fallback")
                 if f.name in slow else f for f in forms]
    return model, forms, None, notes


def _batched(example: torch.Tensor, batch: int) -> torch.Tensor:
    """``example`` resized to ``batch`` rows, cycling through its samples."""
    index = torch.arange(batch, device=example.device) % example.shape[0]
    return example[index].contiguous()


@FORMS.register("auto", "each layer's kernel (dense/csr/bsr[/2:4 on sm80+]) measured at batch_sizes; a sparse kernel "
                        "only where it measured no slower than dense at every batch size")
def _form_auto(model: nn.Module, request: _Request):
    candidates = request.candidates
    if candidates is None:
        device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
        candidates = ("dense", "csr", "bsr") + (("2:4",) if semi_structured_available(device) else ())
    inputs = {b: _batched(request.example_input, b) for b in request.batch_sizes}
    uses = _uses(model)
    tuned = tuple(n for n in request.targets if not _shared_reader(model, uses.get(n, (n,))))  # the rest: dense (_swap)
    report = choose_kernels(model, inputs, candidates, request.timer, layers=tuned,
                            block_size=request.block_size)
    choice = report.choices()
    by_name = {c.name: c for c in report.layers}

    def kernel_of(name: str, module: nn.Module) -> tuple[str, str]:
        layer = by_name[name]
        speedups = ", ".join(f"b{b} {layer.speedup(b):.2f}x" for b in report.batch_sizes if layer.speedup(b))
        if layer.kernel != "dense":
            return choice[name], f"measured {speedups}"
        if len(layer.seconds) > 1:  # dense and at least one sparse kernel were timed
            return choice[name], "dense was fastest"
        if "dense" in layer.skipped:  # e.g. not reached by the example input
            return choice[name], f"kept dense, not timed: {layer.skipped['dense']}"
        why = "; ".join(f"{k}: {r}" for k, r in layer.skipped.items()) or "no sparse candidates"
        return choice[name], f"kept dense, no sparse kernel applies ({why})"

    return model, _swap(model, request, kernel_of), report, []


@FORMS.register("shrink", "physically smaller dense layers from structured masks "
                          "(from prunelab.materialise.shrink import shrink_model)")
def _form_shrink(model: nn.Module, request: _Request):
    from prunelab.materialise.shrink import shrink_model  # lazy: optional sibling module
    from prunelab.masks import MaskSet

    masks = request.masks
    if masks is None:
        masks = MaskSet({**MaskSet.from_model(model, [f"{n}.weight" for n in request.targets]),
                         **_zero_channel_masks(model)})
    return shrink_model(model, masks, request.example_input), [], None, []


def _zero_channel_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``weight FQN -> keep-mask`` of every ConvTranspose layer, read off its zeros: its whole zero OUTPUT channels.

    Shrink (no sparse form) cuts transposed convs too.  A transposed conv's output channel
    ``o`` is ``weight[:, o]`` (``groups=1``; the layer's view
    ``Channel().for_layer(module)``, :class:`prunelab.structure.TransposedChannel`): it is
    pruned when all of it is zero, kept whole otherwise -- an output-channel mask, which
    leaves the layer's input channels to their producer.
    """
    from prunelab.structure import Channel

    found: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, _CONV_TRANSPOSE_TYPES) or not isinstance(weight, torch.Tensor):
            continue
        structure = Channel().for_layer(module)
        shape = tuple(weight.shape)
        keep = structure.to_groups(weight.detach() != 0).any(dim=1)  # (out_channels,)
        found[f"{name}.weight" if name else "weight"] = structure.from_groups(keep, shape).contiguous()
    return found


def _is_target(module: nn.Module) -> bool:
    """A layer materialise can swap: ``TARGET_TYPES``, or a ``transformers`` Conv1D (GPT-2; its Linear twin)."""
    return isinstance(module, TARGET_TYPES) or is_hf_conv1d(module)


def _uses(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every name of each target layer, keyed by its first name (a layer shared by two parents has two)."""
    by_id: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and _is_target(module):
            by_id.setdefault(id(module), []).append(name)
    return {names[0]: tuple(dict.fromkeys(names)) for names in by_id.values()}


def _shared_reader(model: nn.Module, names: Sequence[str]) -> str:
    """The first parent type among a layer's uses ``names`` that reads its weight directly ("" if none)."""
    return next((reader for reader in (_weight_reader(model, n) for n in names) if reader), "")


def _targets(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> tuple[str, ...]:
    """The layers to swap, by first name: all, or those with a mask under any of their names."""
    uses = _uses(model)
    if masks is None:
        return tuple(uses)
    return tuple(n for n, names in uses.items() if any(f"{a}.weight" in masks for a in names))


def _masks_left_dense(model: nn.Module, masks: Mapping[str, torch.Tensor], targets: Sequence[str],
                      forms: Sequence[LayerForm]) -> str:
    """One line naming every masked parameter no sparse kernel took ("" if none).

    Its zeros are in the materialised model (the masks are applied first), but it stays a
    dense tensor: it is no layer this form swaps (an embedding, a bias, an attention
    in-projection), or the form could not take its layer (``kept dense: ...`` in the report).
    """
    uses = _uses(model)
    owners = {f"{a}.weight": n for n in targets for a in uses.get(n, (n,))}  # a shared layer: every name
    modules = dict(model.named_modules(remove_duplicate=False))
    why = {}
    for key in masks:
        if key not in owners:
            parent = modules.get(key.rpartition(".")[0])
            what = type(parent).__name__ if parent is not None else "no module"
            why[key] = f"its {what} is not a layer materialise swaps"
    for f in forms:
        if f.kernel != "dense" or not f.note.startswith("kept dense:"):
            continue
        for key in (f"{a}.weight" for a in uses.get(f.name, (f.name,))):
            if key in masks:
                why[key] = f.note.removeprefix("kept dense:").strip()
    if not why:
        return ""
    shown = "; ".join(f"{k} ({r})" for k, r in list(why.items())[:4]) + (" ..." if len(why) > 4 else "")
    return (f"{len(why)} masked parameter(s) stay dense tensors (their zeros are applied, no sparse kernel runs "
            f"them): {shown}")


def _flat_outputs(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _flat_outputs(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _flat_outputs(v)]
    return []


def _reference_outputs(reference: nn.Module, example_input: torch.Tensor, form: str, *, resized: bool = False,
                       ) -> list[torch.Tensor]:
    """The masked model's outputs on ``example_input``; a model that cannot run it is a one-line PrunelabError.

    Run before any form is built, so a wrong input is reported as such (not as the
    model's own traceback from inside a form builder) and nothing is built from it.
    ``resized``: ``example_input`` is the user's input resized to a timing batch size
    (form ``auto``), which fails when dim 0 is not a batch dimension.
    """
    try:
        with torch.inference_mode():
            return _flat_outputs(reference(example_input))
    except Exception as exc:  # noqa: BLE001 -- the user's model may raise anything on a bad input
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
        what = "example_input resized to a timing batch size, of shape" if resized else "example_input of shape"
        fix = ("example_input needs a leading batch dimension, e.g. x[:8] of shape (8, C, H, W) rather than one "
               "unbatched (C, H, W) sample" if resized else "pass an input the model accepts, e.g. one batch of its data")
        raise PrunelabError(f"materialise {form!r}: the model cannot run {what} {tuple(example_input.shape)} "
                            f"({example_input.dtype}) ({reason}); {fix}") from None


def _compare(ref: list[torch.Tensor], new: nn.Module, example_input: torch.Tensor) -> tuple[float, float]:
    """``(max abs error, max |reference output|)`` over every output tensor; ``ref``: the masked model's outputs."""
    with torch.inference_mode():
        got = _flat_outputs(new(example_input))
    if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got)):
        raise PrunelabError(
            f"the materialised model returns outputs of shapes {[tuple(g.shape) for g in got]} but the masked model "
            f"{[tuple(r.shape) for r in ref]}; this is a bug in the form -- use another form and report it"
        )
    error = max((float((r.float() - g.float()).abs().max()) for r, g in zip(ref, got) if r.numel()), default=0.0)
    scale = max((float(r.float().abs().max()) for r in ref if r.numel()), default=0.0)
    return error, scale


def materialise(
    model: nn.Module,
    form: str,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    example_input: torch.Tensor | None = None,
    timer: Timer | None = None,
    batch_sizes: Sequence[int] = (1, 64),
    block_size: tuple[int, int] = (4, 4),
    candidates: Sequence[str] | None = None,
    tolerance: float = 1e-4,
    pooling: str = "native",
) -> nn.Module:
    """A new model with ``model``'s layers in ``form``, proven against the masked model.

    ``example_input``: real inputs (leading batch dimension), required -- the result is
    checked on it, and ``auto`` times layers on it resized to each of ``batch_sizes``.
    ``timer``/``candidates``: passed to :func:`choose_kernels` (form ``auto``).
    ``block_size``: the BSR block ``(bh, bw)``.  ``pooling="auto"`` also times every
    ``nn.MaxPool2d`` at ``batch_sizes`` and keeps an exact separable pool where it is no
    slower (:func:`~prunelab.materialise.pooling.speed_up_pooling_`; not saved with the
    model); ``"native"`` (default) leaves pooling alone.  Raises :class:`PrunelabError` for an
    unknown form, missing input, an input the model cannot run (a wrong shape or dtype,
    or -- for ``auto`` / ``pooling="auto"`` -- no leading batch dim; checked before
    anything is built), a weight that does not fit the form (e.g. not 2:4 sparse), or a
    result that differs from the masked model by more than ``tolerance`` x the output
    scale.
    """
    builder = FORMS.get(form)  # unknown form -> PrunelabError listing valid forms
    if not isinstance(model, nn.Module):
        raise PrunelabError(f"materialise needs an nn.Module, got {type(model).__name__}; pass the model itself")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0 or example_input.shape[0] == 0:
        raise PrunelabError(
            f"materialise needs example_input, a tensor of real inputs with a batch dimension, got "
            f"{type(example_input).__name__ if not isinstance(example_input, torch.Tensor) else tuple(example_input.shape)}; "
            "pass e.g. example_input=x[:8] -- every materialised form is checked against the masked model on it"
        )
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or min(sizes) < 1:
        raise PrunelabError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}; use e.g. (1, 64)")
    block_size = block_shape(block_size)  # one-line error for e.g. "4x4" or (0, 4)
    if pooling not in POOLING:
        raise PrunelabError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLING)}")
    if form != "shrink" and _is_target(model):  # its layers are swapped inside their parent
        raise PrunelabError(
            f"materialise replaces layers inside a model, but the model itself is a {type(model).__name__} "
            f"(it would silently stay dense); wrap it: materialise(nn.Sequential(layer), {form!r}, ...)"
        )

    reference = copy.deepcopy(model).eval()
    if masks is not None:
        from prunelab.masks import MaskSet

        MaskSet(masks).apply_(reference)
    # shrink traces the model on example_input itself and names the node that fails; every other form checks
    # here, before building anything
    ref = None if form == "shrink" else _reference_outputs(reference, example_input, form)
    if form == "auto" or pooling == "auto":  # both time at batch_sizes: dim 0 of example_input must be a batch dim
        for size in sizes:
            _reference_outputs(reference, _batched(example_input, size), form, resized=True)
    request = _Request(_targets(reference, masks), masks, example_input, timer, sizes, tuple(block_size),
                       None if candidates is None else tuple(candidates))
    new, forms, kernels, notes = builder(copy.deepcopy(reference), request)
    new.eval()
    pools = None
    if pooling == "auto":
        pools = speed_up_pooling_(new, {b: _batched(example_input, b) for b in sizes}, timer)
    if ref is None:
        ref = _reference_outputs(reference, example_input, form)
    error, scale = _compare(ref, new, example_input)
    if not error <= tolerance * max(scale, 1.0):  # also catches nan; scale floor 1 as in shrink_model
        raise PrunelabError(
            f"form {form!r} differs from the masked model by max abs error {error:.3g} on example_input "
            f"(output scale {scale:.3g}, allowed {tolerance:g} x max(scale, 1)); the materialised model is wrong -- "
            "use another form (e.g. dense/csr) and report this"
        )
    if masks is not None and form != "shrink":
        dense = _masks_left_dense(reference, masks, request.targets, forms)
        if dense:
            notes.append(dense)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    new.materialise_report = MaterialiseReport(form, tuple(forms), error, scale, tolerance, kernels, tuple(notes),
                                                 pools)
    return route_save_pretrained(new)  # a transformers model's save_pretrained can write its sparse layers
