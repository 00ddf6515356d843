"""Worker for tests/test_oneshot_distributed.py: one rank of a 2-process gloo one-shot run.

Every rank builds the same residual MLP stack and prunes it with SparseGPT (plain and with
dense targets) from its own shard of the calibration batches; the layer statistics are
summed over ranks, so each rank should end with the weights a single process gets from
all batches.  Writes ``<out>/rank<r>.json``.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

from prunelab import distributed
from prunelab.oneshot import OneShotConfig, prune_oneshot
from residual_mlp import Stack  # tests/ helpers (this script runs from tests/)
from torchrun_exit import finish

CONFIGS = {"plain": OneShotConfig(method="sparsegpt"), "dense_targets": OneShotConfig(method="sparsegpt", dense_targets=True)}


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Stack(width=12, depth=2)


def calibration() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(32, 12, generator=gen) for _ in range(4)]


def pruned_weights(config: OneShotConfig, batches: list[torch.Tensor]) -> dict[str, list]:
    model = build_model()
    prune_oneshot(model, batches, config, progress=False)
    return {name: p.detach().tolist() for name, p in model.named_parameters()}


def main(out: Path) -> None:
    assert distributed.init_from_env(), "run me under torchrun"
    rank, world = distributed.rank(), distributed.world_size()
    shard = calibration()[rank::world]  # each rank sees only its own batches
    record = {"rank": rank, "world_size": world,
              "weights": {label: pruned_weights(config, shard) for label, config in CONFIGS.items()}}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
