"""One-shot pruning of a pretrained transformer from Python: all-MiniLM-L6-v2 to 50% with SparseGPT."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below is local: nothing is downloaded

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from prunelab.bench.minilm import minilm_path  # the packaged model; use your own model folder instead
from prunelab.bench.text import find_tinyshakespeare
from prunelab.oneshot import OneShotConfig, prune_oneshot

hf_logging.disable_progress_bar()  # quiet output; drop this line to see loading progress
path = minilm_path()
tokenizer = AutoTokenizer.from_pretrained(path)
dense = AutoModel.from_pretrained(path).eval()
model = AutoModel.from_pretrained(path).eval()

lines = [line for line in find_tinyshakespeare(None).read_text().splitlines() if line.strip()]
calibration = [tokenizer(lines[i:i + 16], padding=True, return_tensors="pt") for i in range(0, 512, 16)]
held_out = tokenizer(lines[-300:], padding=True, return_tensors="pt")  # never seen in calibration

# SparseGPT on every Linear of the encoder layers; dense_targets: each layer rebuilds the
# dense model's output from the pruned model's inputs, so errors do not pile up layer by layer
config = OneShotConfig(method="sparsegpt", sparsity=0.5, dense_targets=True)
report = prune_oneshot(model, calibration, config, progress=False)


@torch.no_grad()
def embed(encoder, batch):
    """Sentence embeddings as sentence-transformers computes them: mean pooling, L2 norm."""
    hidden = encoder(**batch).last_hidden_state  # (B, T, 384)
    weights = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


cosine = (embed(model, held_out) * embed(dense, held_out)).sum(1)  # (300,)
print(f"pruned {len(report.rows)} layers to {report.sparsity:.1%} in {report.wall_time_s:.0f} s "
      f"(peak RSS {report.peak_rss_mb:.0f} MB)")
print(f"held-out mean cosine to the dense embeddings: {cosine.mean():.3f} (min {cosine.min():.3f})")
worst = max(report.rows, key=lambda row: row.error)
print(f"largest layer error: {worst.name} {worst.error:.4f}")
model.save_pretrained("minilm-sparse")  # loads back with AutoModel.from_pretrained("minilm-sparse")
tokenizer.save_pretrained("minilm-sparse")
