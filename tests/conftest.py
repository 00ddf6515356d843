"""Shared fixtures.  Tests never touch the network; MNIST tests skip without local files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prunelab.bench.download import MNIST_FILES


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder holding the four MNIST IDX .gz files ($PRUNELAB_DATA or ../shared/data)."""
    roots = [Path(os.environ["PRUNELAB_DATA"])] if os.environ.get("PRUNELAB_DATA") else []
    roots.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for root in roots:
        for folder in (root / "mnist", root):
            if all((folder / name).is_file() for name in MNIST_FILES):
                return folder
    pytest.skip("MNIST IDX files not found in $PRUNELAB_DATA or ../shared/data/mnist; set PRUNELAB_DATA to run this test")


@pytest.fixture
def cli(capsys):
    """Run ``prunelab`` in this process: ``cli(*argv) -> (exit status, stdout, stderr)``."""
    from prunelab.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
