# SPDX-License-Identifier: Apache-2.0
"""Fashion-MNIST download with checksum verification, against a local HTTP
server on 127.0.0.1 (no network needed): files land only when their decompressed
content matches; a wrong file is discarded; an unreachable server and a
mismatch are clear one-line CLI errors."""
import functools
import gzip
import hashlib
import http.server
import threading

import pytest

from cifd_kernels.training import data
from cifd_kernels.training.cli import main


def _sums(d):
    out = {}
    for stem in data.FASHION_MNIST_SHA256:
        raw = gzip.decompress((d / f"{stem}.gz").read_bytes())
        out[stem] = (hashlib.sha256(raw).hexdigest(), len(raw))
    return out


@pytest.fixture()
def server(fake_dir):
    """Serves the synthetic dataset's directory on 127.0.0.1 (a free port)."""
    handler = functools.partial(_QuietHandler, directory=str(fake_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_verifies_and_loads(server, fake_dir, tmp_path):
    dest = data.download_fashion_mnist(tmp_path / "dl", base_url=server, checksums=_sums(fake_dir))
    names = sorted(p.name for p in dest.iterdir())
    assert names == sorted(f"{s}.gz" for s in data.FASHION_MNIST_SHA256)  # no .part left
    got, want = data.load_fashion_mnist(dest, val_size=20), data.load_fashion_mnist(fake_dir, val_size=20)
    assert got.test.images.equal(want.test.images) and got.train.labels.equal(want.train.labels)
    # Valid files already there are kept (a second call with the server gone succeeds).
    data.download_fashion_mnist(dest, base_url="http://127.0.0.1:9/", checksums=_sums(fake_dir))


def test_checksum_mismatch_discards_the_file(server, fake_dir, tmp_path):
    sums = _sums(fake_dir)
    stem = "t10k-labels-idx1-ubyte"
    sums[stem] = ("0" * 64, sums[stem][1])
    with pytest.raises(data.DatasetFormatError, match="checksum mismatch"):
        data.download_fashion_mnist(tmp_path / "dl", base_url=server, checksums=sums)
    assert not any(p.name.startswith(stem) for p in (tmp_path / "dl").iterdir())


def test_cli_errors_are_one_line(server, tmp_path, capsys):
    # The synthetic files do not match the real dataset's checksums.
    assert main(["download-data", "--data-dir", str(tmp_path / "a"), "--url", server]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cifd download-data: error: ") and "checksum mismatch" in err
    assert len(err.splitlines()) == 1
    assert main(["download-data", "--data-dir", str(tmp_path / "b"), "--url", "http://127.0.0.1:9/",
                 "--timeout", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not download" in err and len(err.splitlines()) == 1
