"""prunelab: make PyTorch networks sparse, smaller and measurably faster.

The five-line API on any model built from Linear/Conv layers::

    import prunelab
    sparsifier = prunelab.Sparsifier(model, criterion="magnitude", granularity="unstructured",
                                     allocation="global", schedule=prunelab.Cubic(0.9, num_updates=10, frequency=50))
    sparsifier.prepare(optimizer)            # then call sparsifier.step() after every optimizer.step()
    masks = sparsifier.finalize()            # MaskSet; model.state_dict() stays a plain state_dict
    masks.save("masks.safetensors")

Importing prunelab registers nothing globally and starts nothing.
"""

from prunelab.allocation import ALLOCATIONS, LayerBudget, select_top_k
from prunelab.criteria import CRITERIA, ScoreData, get_criterion
from prunelab.errors import PrunelabError
from prunelab.loading import load
from prunelab.masks import MaskSet
from prunelab.materialise import materialise
from prunelab.schedules import SCHEDULES, Cubic, Geometric, OneShot
from prunelab.sparsifier import Sparsifier
from prunelab.structure import GRANULARITIES, NM, get_granularity
from prunelab.targets import LayerRules, prunable_parameters

__version__ = "0.1.0"

__all__ = [
    "ALLOCATIONS", "CRITERIA", "GRANULARITIES", "SCHEDULES", "NM", "Cubic", "Geometric", "LayerBudget", "LayerRules",
    "MaskSet", "OneShot", "PrunelabError", "ScoreData", "Sparsifier", "get_criterion", "get_granularity", "load", "materialise",
    "prunable_parameters", "select_top_k", "__version__",
]
