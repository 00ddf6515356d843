"""Checksum-verified downloads (for users with a network; tests use ``file://`` URLs).

Every file is written to a temporary name beside its destination, its sha256 is checked,
and only then is it renamed into place with :func:`os.replace` (atomic on POSIX and
Windows), so an interrupted or corrupt download never leaves a file that looks valid.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from prunelab.errors import PrunelabError

#: torchvision's S3 mirror of the original LeCun et al. (1998) MNIST IDX files.
DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"

#: The four original MNIST files and their sha256 (read-only mapping).
MNIST_FILES: Mapping[str, str] = MappingProxyType({
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
})

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise :class:`PrunelabError` unless ``path`` has sha256 ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise PrunelabError(
            f"{os.fspath(path)}: sha256 mismatch (file corrupt or truncated); delete it and re-download "
            f"(--download); expected sha256 {expected[:16]}..., got {actual[:16]}..."
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fetch(url: str, dest: str | os.PathLike, sha256: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` via a temporary file; keep it only if its sha256 matches.

    The kept file gets the mode a plain ``open()`` would give it (``mkstemp`` creates 0600).
    """
    dest = Path(dest)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise PrunelabError(
            f"cannot write into {os.fspath(dest.parent)!r} ({exc.strerror}); pass an existing, writable --data-dir"
        ) from None
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http(s)/file only)
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        digest.update(chunk)
                        out.write(chunk)
            # URLError and socket errors are OSErrors; a URL without a scheme is a ValueError;
            # a connection cut mid-body (IncompleteRead) or a garbled reply is an HTTPException
            except (OSError, ValueError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise PrunelabError(
                    f"cannot download {url} ({type(exc).__name__}: {reason}); check the network or --download mirror "
                    f"(an http://, https:// or file:// URL), or copy {dest.name} by hand into {os.fspath(dest.parent)}"
                ) from None
        if digest.hexdigest() != sha256:
            raise PrunelabError(
                f"downloaded {url}: sha256 mismatch (file corrupt or truncated); it was deleted, retry the "
                f"download or fetch {dest.name} from another mirror; expected {sha256[:16]}..., "
                f"got {digest.hexdigest()[:16]}..."
            )
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def download_mnist(dest_dir: str | os.PathLike, base_url: str = DEFAULT_MIRROR) -> Path:
    """Download the four MNIST IDX files into ``dest_dir``, each checksum-verified.

    Files already present with the right sha256 are kept; ``base_url`` may be any URL
    ``urllib`` opens (``https://``, ``file://``).  Returns ``dest_dir``.
    """
    dest_dir = Path(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrunelabError(
            f"cannot create MNIST folder {os.fspath(dest_dir)!r} ({exc.strerror}); pass a writable --data-dir"
        ) from None
    base = base_url if base_url.endswith("/") else base_url + "/"
    for name, sha256 in MNIST_FILES.items():
        target = dest_dir / name
        if target.is_file() and sha256_file(target) == sha256:
            continue
        fetch(base + name, target, sha256)
    return dest_dir
