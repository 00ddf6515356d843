"""Measure what a (masked) model costs: parameters, nonzeros, MACs/FLOPs, storage bytes, and tables of them.

``measure_model(model, example_input, masks)`` runs one forward pass with hooks on every
Linear/Conv layer (and attention module) and returns a per-sample :class:`ModelCost`, whose
``attention`` lists the Q K^T / A V products apart from the layers' MACs; ``model_cost_table``
and ``markdown_table`` turn costs and records into GitHub markdown.
"""

from prunelab.measure.costs import AttentionCost, LayerCost, ModelCost
from prunelab.measure.counting import measure_model
from prunelab.measure.tables import format_bytes, format_float, markdown_table, model_cost_table

__all__ = ["AttentionCost", "LayerCost", "ModelCost", "format_bytes", "format_float", "markdown_table",
           "measure_model", "model_cost_table"]
