"""Shared fixtures.  Tests never touch the network; MNIST tests skip without local files."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunelab.bench.download import MNIST_FILES
from prunelab.errors import PrunelabError


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny models: they gain nothing from threads,
    and spinning threads crawl on a busy CPU.  Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from prunelab.bench.text import find_tinyshakespeare

    try:
        return find_tinyshakespeare(None).parent
    except PrunelabError:
        pytest.skip("tinyshakespeare/input.txt not found in $PRUNELAB_DATA or ../shared/data; set PRUNELAB_DATA")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BertModel with a character WordPiece vocabulary, saved by save_pretrained."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny_bert")
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.BertModel(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture
def torchrun(tmp_path):
    """``torchrun(worker_file) -> [rank 0 record, rank 1 record]``: run ``tests/<worker_file>``
    in 2 gloo processes with ``tmp_path`` as its argument; each rank writes ``rank<r>.json``."""

    def run(worker: str) -> list[dict]:
        src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's code, as pytest imports it
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
               "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", str(Path(__file__).with_name(worker)),
               str(tmp_path)]
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["world_size"] for r in ranks] == [2, 2]
        return ranks

    return run
