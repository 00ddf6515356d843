"""Importance criteria: the *score* step of the pipeline (DESIGN.md).

Every entry of :data:`CRITERIA` is a criterion class; ``get_criterion(name, **kwargs)``
builds one.  A criterion maps ``(model, params, data)`` to one float32 score tensor per
parameter (higher = keep) without changing the model; see :mod:`prunelab.criteria.base`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prunelab.criteria.activation import APoZ
from prunelab.criteria.base import Criterion, ScoreData
from prunelab.criteria.magnitude import L1Norm, L2Norm, LpNorm, Magnitude
from prunelab.criteria.movement import Movement
from prunelab.criteria.obd import OBD
from prunelab.criteria.pai import SNIP, GraSP, SynFlow
from prunelab.criteria.random_scores import RandomScores
from prunelab.criteria.regression import Regression
from prunelab.criteria.slimming import BNScale
from prunelab.criteria.taylor import Taylor
from prunelab.errors import PrunelabError
from prunelab.registry import Registry

CRITERIA: Registry[type[Criterion]] = Registry("criterion")
CRITERIA.add("random", RandomScores, "i.i.d. uniform scores from a seeded generator (baseline)")
CRITERIA.add("magnitude", Magnitude, "|w| (Han et al. 2015)")
CRITERIA.add("l1", L1Norm, "group L1 norm sum|w| (Li et al. 2017)")
CRITERIA.add("l2", L2Norm, "group L2 norm sqrt(sum w^2)")
CRITERIA.add("lp", LpNorm, "group Lp norm (sum|w|^p)^(1/p), p=2.0")
CRITERIA.add("taylor", Taylor, "first-order Taylor |w * dL/dw|, mean over batches (Molchanov et al. 2017/2019); needs data")
CRITERIA.add("obd", OBD, "Optimal Brain Damage 1/2 h_ii w^2, exact or Fisher diagonal (LeCun et al. 1990); needs data")
CRITERIA.add("snip", SNIP, "SNIP connection sensitivity |w * dL/dw| / sum, at init (Lee et al. 2019); needs data")
CRITERIA.add("grasp", GraSP, "GraSP w * Hg, keeps what gradient-flow preservation keeps (Wang et al. 2020); needs data")
CRITERIA.add("synflow", SynFlow, "SynFlow |w| * dR/d|w|, R = 1^T prod|W| 1, data-free (Tanaka et al. 2020)")
CRITERIA.add("apoz", APoZ, "1 - APoZ: fraction of nonzero post-ReLU outputs per neuron/channel (Hu et al. 2016); needs data")
CRITERIA.add("movement", Movement, "movement -sum_t w*dL/dw, accumulated in training or one pass (Sanh et al. 2020); needs data")
CRITERIA.add("slimming", BNScale, "network slimming |gamma| of the following BatchNorm per channel, else |w| (Liu et al. 2017)")
CRITERIA.add("regression", Regression, "LASSO channel selection on the next layer's output (He et al. 2017); needs data")


def get_criterion(name: str, **kwargs: Any) -> Criterion:
    """Build the criterion registered as ``name`` with constructor ``kwargs`` (e.g. ``p=3``)."""
    cls = CRITERIA.get(name)
    accepted = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise PrunelabError(
            f"criterion {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) if accepted else 'no options'}"
        )
    return cls(**kwargs)


__all__ = ["CRITERIA", "Criterion", "ScoreData", "get_criterion"]
