"""A fake autotune timer for tests: preset seconds, every call recorded (no timing, deterministic)."""

from prunelab.materialise.autotune import Trial


class FakeTimer:
    """Seconds per (layer, kernel) or (layer, kernel, batch) -- 1.0 when not listed; records every call."""

    def __init__(self, table):
        self.table = table
        self.calls: list[tuple[str, str, int]] = []

    def __call__(self, trial):
        assert isinstance(trial, Trial)
        self.calls.append((trial.layer, trial.kernel, trial.batch_size))
        key = (trial.layer, trial.kernel, trial.batch_size)
        return self.table.get(key, self.table.get(key[:2], 1.0))
