"""peak_rss_mb: this process's high-water mark, in MiB."""

from __future__ import annotations

import torch

from prunelab.measure.memory import peak_rss_mb


def test_peak_grows_with_a_large_allocation_and_never_falls():
    before = peak_rss_mb()
    block = torch.ones(64 * 2**20 // 4 * 5)  # 320 MiB of float32, touched by ones()
    during = peak_rss_mb()
    del block
    assert during >= before and during >= 320
    assert peak_rss_mb() >= during  # a peak, not the current size
