"""A first-order energy model of one inference: MACs, bytes moved, picojoules.

Energy per operation from Horowitz, "Computing's energy problem (and what we can do
about it)", ISSCC 2014, 45 nm at 0.9 V -- the table Han et al. use to motivate pruning
(NeurIPS 2015, Table 1; Deep Compression, ICLR 2016, Fig. 1).  The model::

    E_layer = MACs * (E_fmult + E_fadd)                 compute, fp32
            + weight_bytes / 4 * E_DRAM                 each stored weight fetched once from DRAM
            + activation_bytes / 4 * E_SRAM             inputs read once, outputs written once
            (+ decode ops for the compressed form, see ASSUMPTIONS)

per layer (every Linear/Conv/ConvTranspose layer, ``transformers``' Conv1D and materialised sparse module, as
counted by :func:`~prunelab.measure.counting.measure_model`; other parameters are not
modelled), for several storage forms of the same model.  A weight (or bias) tensor is
fetched once per inference however many times it is used: a module called twice, or two
layers sharing one tied weight, multiply it every time (MACs count per use) but read its
bytes once -- charged to the first layer the forward pass reaches that uses it; the tied
layers after it read only a bias of their own.  A layer the forward never calls fetches
nothing (0 MACs, 0 bytes).  The forms:

* ``dense``      -- every MAC, every weight fetched as fp32.
* ``pruned``     -- only nonzero MACs; only nonzero weights fetched, as fp32 with no index
                    overhead (the ideal a sparse format can approach).
* ``sparse``     -- nonzero MACs; weights fetched at the smaller of CSR and bitmap size
                    (:attr:`prunelab.measure.counting.LayerCost.best_sparse_bytes`), or, for a
                    layer already materialised in a sparse format (CSR/BSR/2:4), at the
                    bytes that format stores (:attr:`~prunelab.measure.counting.LayerCost.format_bytes`).
* ``compressed`` -- nonzero MACs; weights fetched at their Deep Compression file size
                    (given a :class:`~prunelab.compress.CompressionReport`), plus one
                    register-file read (codebook lookup) and one int add (relative index)
                    per stored entry (each nonzero, and each filler zero the relative index
                    inserts: the decoder walks both).

The numbers are an order-of-magnitude guide, not a measurement: real chips have caches,
batching and data reuse that change the DRAM share a lot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.measure.attention import IN_PROJECTION_KIND, attention_modules, child_name, in_projections, mha_call
from prunelab.measure.costs import BYTES_PER_VALUE
from prunelab.measure.counting import measure_model, measured_layers

__all__ = ["ASSUMPTIONS", "FORMS", "HOROWITZ_45NM", "EnergyReport", "EnergyTable", "LayerEnergy", "assumptions_text",
           "estimate_energy"]

FORMS = ("dense", "pruned", "sparse", "compressed")


@dataclass(frozen=True)
class EnergyTable:
    """Energy per 32-bit operation or access, in picojoules.

    Source: M. Horowitz, "Computing's energy problem (and what we can do about it)",
    IEEE ISSCC 2014, pp. 10-14 (45 nm, 0.9 V); as tabulated by Han et al., NeurIPS 2015, Table 1.
    """

    float_add_pj: float = 0.9
    float_mult_pj: float = 3.7
    int_add_pj: float = 0.1
    int_mult_pj: float = 3.1
    register_pj: float = 1.0       # 32-bit register file access
    sram_pj: float = 5.0           # 32-bit SRAM read (8 KB cache)
    dram_pj: float = 640.0         # 32-bit DRAM read
    source: str = "Horowitz, ISSCC 2014, 45 nm (Han et al. 2015, Table 1)"

    @property
    def mac_pj(self) -> float:
        """One fp32 multiply-accumulate = one float mult + one float add."""
        return self.float_mult_pj + self.float_add_pj


HOROWITZ_45NM = EnergyTable()

def _pj(value: float) -> str:
    return f"{value:g}"


def assumptions_text(table: EnergyTable) -> str:
    """The model's assumptions, with ``table``'s own DRAM and SRAM energies (print it next to the numbers)."""
    return (
        "Batch 1, one inference. One MAC = one fp32 multiply + one fp32 add; bias additions and "
        "non-Linear/Conv layers are not counted. Every stored weight byte (bias included) is read once "
        f"from DRAM per inference, at {_pj(table.dram_pj)} pJ per 32-bit word pro rata (E_DRAM / 4 per byte, "
        "partial words allowed): a weight used several times (a module called twice, tied weights shared by two "
        "layers) costs MACs for every use but is fetched once, by the first layer that runs with it, and stays on "
        "chip for the other uses; a layer the forward never calls fetches nothing. Activations live in SRAM: each "
        "layer call reads its input once and "
        "writes its output once as fp32, a write costing the same as a read "
        f"({_pj(table.sram_pj)} pJ per 32-bit word). "
        "Pruned/sparse/compressed forms skip zero MACs (perfect load balance, no index arithmetic except "
        "as stated). The compressed form adds, per stored entry it fetches (nonzero or filler zero of the relative "
        "index), one register-file read (codebook lookup) and one int add (relative index); Huffman decoding is not "
        "modelled."
    )


ASSUMPTIONS = assumptions_text(HOROWITZ_45NM)


@dataclass(frozen=True)
class LayerEnergy:
    """One layer in one storage form; energies in picojoules, per inference."""

    layer: str
    form: str
    macs: int
    weight_bytes: float
    activation_bytes: int
    compute_pj: float
    weight_pj: float
    activation_pj: float

    @property
    def total_pj(self) -> float:
        return self.compute_pj + self.weight_pj + self.activation_pj

    def to_row(self) -> dict[str, Any]:
        return {"layer": self.layer, "form": self.form, "macs": self.macs, "weight_bytes": self.weight_bytes,
                "activation_bytes": self.activation_bytes, "compute_pj": self.compute_pj,
                "weight_pj": self.weight_pj, "activation_pj": self.activation_pj, "total_pj": self.total_pj}


@dataclass(frozen=True)
class EnergyReport:
    """Per-layer energy of every form, its totals, the table used and the assumptions (print them)."""

    layers: tuple[LayerEnergy, ...]
    forms: tuple[str, ...]
    table: EnergyTable
    assumptions: str = ASSUMPTIONS

    def total(self, form: str) -> dict[str, float]:
        if form not in self.forms:
            raise PrunelabError(f"form {form!r} was not estimated; estimated forms: {', '.join(self.forms)}")
        rows = [l for l in self.layers if l.form == form]
        return {key: sum(getattr(l, key) for l in rows) for key in
                ("macs", "weight_bytes", "activation_bytes", "compute_pj", "weight_pj", "activation_pj", "total_pj")}

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per form: totals in nJ and the saving relative to ``dense``."""
        dense = self.total("dense")["total_pj"]
        rows = []
        for form in self.forms:
            t = self.total(form)
            rows.append({"form": form, "macs": t["macs"], "weight_bytes": t["weight_bytes"],
                         "compute_nj": t["compute_pj"] / 1e3, "weight_nj": t["weight_pj"] / 1e3,
                         "activation_nj": t["activation_pj"] / 1e3, "energy_nj": t["total_pj"] / 1e3,
                         "energy_saving_x": dense / t["total_pj"] if t["total_pj"] else float("inf")})
        return rows

    def to_rows(self) -> list[dict[str, Any]]:
        return [l.to_row() for l in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {"table": {k: getattr(self.table, k) for k in self.table.__dataclass_fields__},
                "assumptions": self.assumptions, "summary": self.summary_rows(), "layers": self.to_rows()}


def _weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def _fetches(cost: Any) -> dict[str, tuple[bool, bool]]:
    """Layer name -> (fetches its weight, fetches its bias): each tensor once, by the first layer that runs with it."""
    fetched: set[tuple[str, str]] = set()
    out = {}
    for layer in cost.layers:
        weight, bias = ("weight", layer.tied_to or layer.name), ("bias", layer.bias_tied_to or layer.name)
        reads_weight = layer.reached and weight not in fetched
        reads_bias = layer.reached and layer.bias_params > 0 and bias not in fetched
        fetched.update(key for key, read in ((weight, reads_weight), (bias, reads_bias)) if read)
        out[layer.name] = (reads_weight, reads_bias)
    return out


def _activation_elements(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Per-sample (input, output) element counts of every measured layer, from one forward pass."""
    sizes: dict[str, list[int]] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            entry = sizes.setdefault(name, [0, 0])
            entry[0] += inputs[0].numel() if inputs and isinstance(inputs[0], torch.Tensor) else 0
            entry[1] += output.numel()
        return hook

    def make_attention_hook(name: str, module: nn.MultiheadAttention):
        # its q/k/v projections read (tokens, in) and write (tokens, E); its out_proj (N*L, E) -> (N*L, E)
        projections = in_projections(name, module)

        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            call = mha_call(module, args, kwargs)
            for p in projections:
                entry = sizes.setdefault(p.name, [0, 0])
                entry[0] += p.positions(call) * p.weight.shape[1]
                entry[1] += p.positions(call) * module.embed_dim
            entry = sizes.setdefault(child_name(name, "out_proj"), [0, 0])
            entry[0] += call.batch * call.query_len * module.embed_dim
            entry[1] += call.batch * call.query_len * module.embed_dim
        return hook

    modes = {module: module.training for module in model.modules()}
    try:
        for name, module in measured_layers(model).items():
            handles.append(module.register_forward_hook(make_hook(name)))
        for name, module in attention_modules(model).items():
            handles.append(module.register_forward_hook(make_attention_hook(name, module), with_kwargs=True))
        model.eval()
        with torch.no_grad():
            param = next(model.parameters(), None)
            model(example_input.to(param.device) if param is not None else example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    batch = example_input.shape[0]
    return {name: (i // batch, o // batch) for name, (i, o) in sizes.items()}


def estimate_energy(
    model: nn.Module,
    example_input: torch.Tensor,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    compressed: Any = None,
    table: EnergyTable = HOROWITZ_45NM,
) -> EnergyReport:
    """Energy of one inference of ``model`` per Linear/Conv layer, for each storage form.

    ``masks``: weight FQN -> keep-mask (nonzeros = kept AND nonzero, as in
    :func:`~prunelab.measure.counting.measure_model`).  ``compressed``: a
    :class:`~prunelab.compress.CompressionReport` of this model adds the ``compressed``
    form (its per-layer file bytes, bias and headers included, are the DRAM traffic).
    ``example_input``'s first dimension is the batch; costs are per sample.

    ``nn.MultiheadAttention``'s q/k/v in-projections count as layers (the compressed file
    stores them raw, so their compressed form reads their dense bytes); the attention
    products Q K^T and A V (``ModelCost.attention_macs``) are not modelled.  A model with none
    of those layers is refused (its estimate would be all zeros).  The report's ``assumptions``
    state ``table``'s DRAM and SRAM energies.
    """
    if not isinstance(table, EnergyTable):
        raise PrunelabError(f"table must be an EnergyTable, got {type(table).__name__}; pass e.g. HOROWITZ_45NM")
    if isinstance(model, nn.Module) and not measured_layers(model) and not attention_modules(model):
        raise PrunelabError(
            f"estimate_energy found no layer to estimate in {type(model).__name__}: the energy model counts nn.Linear "
            f"(and transformers' Conv1D), "
            f"nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, nn.MultiheadAttention and prunelab's sparse modules -- pass "
            f"a model built from them"
        )
    cost = measure_model(model, example_input, masks)
    activations = _activation_elements(model, example_input)
    file_layers: dict[str, Any] = {}
    if compressed is not None:
        layers = getattr(compressed, "layers", None)
        if layers is None:
            raise PrunelabError(f"compressed must be a CompressionReport, got {type(compressed).__name__}; "
                                "pass what write_compressed returned")
        file_layers = {l.name: l for l in layers}  # keyed by weight FQN
        missing = [_weight_name(l.name) for l in cost.layers
                   if l.kind != IN_PROJECTION_KIND and _weight_name(l.name) not in file_layers]
        if missing:
            raise PrunelabError(f"the CompressionReport has no layer {missing[0]!r}; pass the report written for "
                                "this model")
    forms = FORMS if compressed is not None else FORMS[:3]
    fetches = _fetches(cost)
    rows = []
    for layer in cost.layers:
        act_in, act_out = activations.get(layer.name, (0, 0))
        act_bytes = BYTES_PER_VALUE * (act_in + act_out)
        reads_weight, reads_bias = fetches[layer.name]
        for form in forms:
            macs = layer.dense_macs if form == "dense" else layer.sparse_macs
            compute = macs * table.mac_pj
            bias_bytes = BYTES_PER_VALUE * layer.bias_params  # the bias part of this form's bytes
            if form == "dense":
                stored_bytes: float = layer.dense_bytes
            elif form == "pruned":
                stored_bytes = BYTES_PER_VALUE * layer.weight_nonzeros + bias_bytes
            elif form == "sparse":
                stored_bytes = layer.best_sparse_bytes if layer.format_bytes is None else layer.format_bytes
            elif layer.kind == IN_PROJECTION_KIND:  # not a Linear/Conv weight: the file stores it raw
                stored_bytes = layer.dense_bytes
            else:
                stored = file_layers[_weight_name(layer.name)]
                stored_bytes, bias_bytes = stored.total_bytes, stored.bias_bytes
                if reads_weight:  # decoded as it is fetched: every entry, filler zeros included
                    compute += stored.entries * (table.register_pj + table.int_add_pj)
            weight_bytes = (stored_bytes - bias_bytes if reads_weight else 0) + (bias_bytes if reads_bias else 0)
            rows.append(LayerEnergy(
                layer=layer.name, form=form, macs=macs, weight_bytes=weight_bytes, activation_bytes=act_bytes,
                compute_pj=compute, weight_pj=weight_bytes / 4 * table.dram_pj,
                activation_pj=act_bytes / 4 * table.sram_pj,
            ))
    return EnergyReport(tuple(rows), forms, table, assumptions_text(table))
