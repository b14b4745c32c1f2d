# SPDX-License-Identifier: Apache-2.0
"""Fashion-MNIST's four ``.gz`` files fetched from the official release and
checked against the sha256 of their decompressed content."""
from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path
from typing import Optional

from .errors import DatasetFormatError, DatasetNotFoundError


# The official release (zalandoresearch/fashion-mnist) and, per file, the sha256 and
# size of the *decompressed* IDX content: mirrors that recompress the .gz files
# (Debian's package does) still match. Computed from Debian's dataset-fashion-mnist.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}


def _gz_content_ok(path: Path, sha256: str, size: int) -> bool:
    h, n = hashlib.sha256(), 0
    try:
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                n += len(chunk)
    except (OSError, EOFError):
        return False
    return n == size and h.hexdigest() == sha256


def download_fashion_mnist(dest: str | os.PathLike, *, base_url: str = FASHION_MNIST_URL,
                           timeout: float = 60.0,
                           checksums: Optional[dict[str, tuple[str, int]]] = None) -> Path:
    """Download the four Fashion-MNIST ``.gz`` files from ``base_url`` into ``dest``.

    Each file is fetched to ``<name>.part`` and moved into place only once the
    sha256 and size of its decompressed content match ``checksums`` (default
    :data:`FASHION_MNIST_SHA256`), so ``dest`` never holds a partial or wrong
    file; files already there and valid are kept. Raises
    :class:`DatasetNotFoundError` when the server cannot be reached and
    :class:`DatasetFormatError` on a checksum mismatch (the download is
    discarded). Returns ``dest``, ready for ``--data-dir``.
    """
    import shutil
    import urllib.error
    import urllib.request

    sums = FASHION_MNIST_SHA256 if checksums is None else checksums
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for stem, (sha, size) in sums.items():
        final = dest / f"{stem}.gz"
        if final.exists() and _gz_content_ok(final, sha, size):
            continue
        url = base_url.rstrip("/") + f"/{stem}.gz"
        part = final.with_name(final.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
                shutil.copyfileobj(r, f)
        except (urllib.error.URLError, OSError, ValueError) as e:
            part.unlink(missing_ok=True)
            raise DatasetNotFoundError(
                f"could not download {url} ({e}). Without network, install "
                f"`apt-get install dataset-fashion-mnist` or pass --data-dir with the IDX files.") from e
        if not _gz_content_ok(part, sha, size):
            part.unlink(missing_ok=True)
            raise DatasetFormatError(
                f"{url}: checksum mismatch (the decompressed file is not {size} bytes with sha256 "
                f"{sha}); the download was discarded")
        os.replace(part, final)
    return dest
