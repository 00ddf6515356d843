"""One cached 2-rank gloo run of a worker script per test module, killed on a hang (a helper, not tests).

A worker writes ``<out>/rank<r>.json`` per rank, each record holding ``world_size`` and, per
part it checks (e.g. ``uneven``, ``edges``), the part's results and ``<part>_in_step`` (a
sum over the ranks taken after the part: the ranks were still in step).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest


class CachedTorchrun:
    """``worker`` run once under torchrun (2 processes), its records and its module shared by a test file."""

    def __init__(self, worker: Path, timeout: float = 90.0) -> None:
        self.worker_path, self.timeout = worker, timeout
        self._module: ModuleType | None = None
        self._run: tuple[list[dict], str | None] | None = None

    def worker(self) -> ModuleType:
        """The worker imported into this process (its functions are the single-process references)."""
        if self._module is None:
            sys.path.insert(0, str(self.worker_path.parent))  # the worker imports tests/torchrun_exit.py
            spec = importlib.util.spec_from_file_location(self.worker_path.stem, self.worker_path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self._module = module
        return self._module

    def ranks(self, part: str, out: Path) -> list[dict]:
        """``part`` of both ranks' records (with ``in_step``), from the one cached run."""
        if self._run is None:
            self._run = self._torchrun(out)
        records, failed = self._run
        if not all(part in r for r in records):
            pytest.fail(f"the 2-rank run wrote no {part} records: {failed}")
        assert [r["world_size"] for r in records] == [2, 2]
        return [{**r[part], "in_step": r[f"{part}_in_step"]} for r in records]

    @property
    def failed(self) -> str | None:
        """Why the run failed (its stderr's tail, or a hang), None if it finished cleanly or has not run."""
        return None if self._run is None else self._run[1]

    def _torchrun(self, out: Path) -> tuple[list[dict], str | None]:
        """Run the worker on 2 gloo ranks: ``(records written, why the run failed or None)``.  On a hang
        torchrun and its workers (their own session) are killed."""
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
               "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", str(self.worker_path), str(out)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=self.timeout)
            failed = None if proc.returncode == 0 else stderr[-3000:]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started, nothing else
            proc.communicate()
            failed = f"the 2-rank run did not finish in {self.timeout:.0f} s: a rank is waiting in a collective"
        files = [out / f"rank{r}.json" for r in (0, 1)]
        return [json.loads(f.read_text()) if f.exists() else {} for f in files], failed
