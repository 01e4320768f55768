"""WikiText-2 for the export workflow's hosted runner: Hugging Face's copy (Salesforce/wikitext, parquet),
written as the exact files every figure in BENCHMARKS.md was measured on (checked by sha256:
exporter.defaults.WIKITEXT2_FILES). Files already there and intact are not downloaded again. ptekit itself
never downloads anything; this is a setup step of .ci/export-job, like its pip installs.

    .venv/bin/python .ci/fetch_wikitext2.py DEST_DIR     (a download needs pyarrow)

The parquet holds one row per line of the original release, with "" for its blank lines. The two files
are rebuilt from those rows in the two forms they have always had:
- wikitext-2-raw-test.txt: the rows joined with blank lines ("\\n\\n".join, as GPTQ and SpinQuant
  evaluate), with CRLF line ends;
- wikitext-2-valid-tokens.txt: the original wiki.valid.tokens, a UTF-8 byte-order mark and then every
  row, a blank row written back as " \\n".
"""

from __future__ import annotations

import hashlib
import io
import sys
import urllib.request
from pathlib import Path

from exporter.atomic import atomic_path
from exporter.defaults import WIKITEXT2_FILES
from exporter.errors import PtekitError

BASE = "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/"
SOURCES = {
    "wikitext-2-raw-test.txt": "wikitext-2-raw-v1/test-00000-of-00001.parquet",
    "wikitext-2-valid-tokens.txt": "wikitext-2-v1/validation-00000-of-00001.parquet",
}


def file_bytes(name: str, rows: list[str]) -> bytes:
    if name == "wikitext-2-raw-test.txt":
        return "\n\n".join(rows).replace("\n", "\r\n").encode("utf-8")
    if name == "wikitext-2-valid-tokens.txt":
        return ("\ufeff" + "".join(r if r else " \n" for r in rows)).encode("utf-8")
    raise ValueError(name)


def parquet_rows(data: bytes) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PtekitError("reading Hugging Face's parquet files needs pyarrow: pip install pyarrow") from None
    return pq.read_table(io.BytesIO(data)).column("text").to_pylist()


def write_checked(dest: Path, name: str, data: bytes) -> Path:
    """Writes DEST/NAME only if its bytes are the ones the figures were measured on."""
    got = hashlib.sha256(data).hexdigest()
    if got != WIKITEXT2_FILES[name]:
        raise PtekitError(f"{name}: built {len(data)} bytes with sha256 {got}, expected "
                          f"{WIKITEXT2_FILES[name]}; the Hugging Face copy has changed, nothing was written")
    path = dest / name
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


def fetch(dest: Path, echo=lambda s: None) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name, src in SOURCES.items():
        if (dest / name).is_file() and hashlib.sha256((dest / name).read_bytes()).hexdigest() == WIKITEXT2_FILES[name]:
            out.append(dest / name)
            continue
        echo(f"downloading {BASE + src}")
        try:
            with urllib.request.urlopen(BASE + src, timeout=120) as r:
                raw = r.read()
        except OSError as e:
            raise PtekitError(f"{BASE + src}: download failed ({e}); check the network, or copy WikiText-2's "
                              f"files into {dest} by hand") from None
        out.append(write_checked(dest, name, file_bytes(name, parquet_rows(raw))))
    return out


if __name__ == "__main__":
    try:
        for p in fetch(Path(sys.argv[1]), echo=lambda s: print(s, file=sys.stderr)):
            print(p)
    except PtekitError as e:
        sys.exit(f"error: {e}")
