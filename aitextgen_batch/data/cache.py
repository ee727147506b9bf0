"""The on-disk token cache: `index.json` plus MessagePack shard files, written atomically and read without parsing.

A cache folder holds

    index.json                 written last: a folder without it is an interrupted build, not a cache
    shard-00000.msgpack.gz     one MessagePack map per shard, gzipped (`shard-00000.msgpack` with --no-compress)

A shard map holds `format`, `version`, `shard`, `dtype`, `num_tokens`, for line_by_line caches `num_samples` and
`offsets` (little-endian uint64 sample starts within the shard), and `tokens`: the little-endian token ids as the
raw bytes of `dtype`, so `numpy.frombuffer` loads a shard in one step. MessagePack carries only maps, strings,
integers and bytes: nothing in a cache can run code when read (no pickle, no `.npy`).

The index records the format version, the tokenizer fingerprint, vocabulary size, token dtype, `line_by_line`, the
totals, and per shard its token count, byte size and sha256, so a missing, truncated or corrupt shard is named.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError
from ..storage import atomic_write

FORMAT = "aitextgen-batch/token-cache"
SHARD_FORMAT = "aitextgen-batch/token-shard"
VERSION = 1
INDEX = "index.json"
GZIP_LEVEL = 6  # level 9 is ~3x slower for ~2% smaller token shards
REBUILD = "rebuild the cache with `aitextgen-batch prepare`"
_INDEX_KEYS = ("tokenizer_fingerprint", "vocab_size", "eos_token_id", "dtype", "line_by_line", "total_tokens", "shards")


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    for name, bits in (("uint8", 8), ("uint16", 16), ("uint32", 32)):
        if vocab_size <= 1 << bits:
            return name
    raise UserError(f"a vocabulary of {vocab_size:,} tokens does not fit 32-bit token ids")


def shard_name(i: int, compress: bool) -> str:
    return f"shard-{i:05d}.msgpack" + (".gz" if compress else "")


class _HashingWriter:
    """A write-only file wrapper that hashes and counts the bytes that reach the disk."""

    def __init__(self, f):
        self.f, self.size, self.sha = f, 0, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _bin_header(n: int) -> bytes:
    """The MessagePack header of a `bin` of n bytes, so a payload can be streamed after it."""
    for code, width in ((0xC4, 1), (0xC5, 2), (0xC6, 4)):
        if n < 1 << (8 * width):
            return bytes([code]) + n.to_bytes(width, "big")
    raise UserError(f"a shard would hold {n:,} bytes of tokens, over MessagePack's 4 GiB limit; use more --num-shards")


def write_shard(path: Path, header: dict, blobs: list[tuple[str, int, Iterable[bytes]]], compress: bool) -> dict:
    """Write one shard map: the small `header` values, then each (key, nbytes, chunks) blob streamed as `bin`.

    Returns:
        The shard's index entry: file name, size in bytes and sha256 of the file as written.
    """
    import msgpack

    packer = msgpack.Packer()
    with atomic_write(path) as f:
        out = _HashingWriter(f)
        sink = out
        if compress:  # mtime=0 and no file name: the same tokens give the same bytes and checksum
            sink = gzip.GzipFile(filename="", fileobj=out, mode="wb", compresslevel=GZIP_LEVEL, mtime=0)
        sink.write(packer.pack_map_header(len(header) + len(blobs)))
        for key, value in header.items():
            sink.write(packer.pack(key))
            sink.write(packer.pack(value))
        for key, nbytes, chunks in blobs:
            sink.write(packer.pack(key))
            sink.write(_bin_header(nbytes))
            written = 0
            for chunk in chunks:
                sink.write(chunk)
                written += len(chunk)
            if written != nbytes:
                raise RuntimeError(f"{path.name}: {key} has {written} bytes, expected {nbytes}")
        if compress:
            sink.close()
    return {"file": path.name, "bytes": out.size, "sha256": out.sha.hexdigest()}


def write_index(folder: Path, index: dict) -> None:
    with atomic_write(folder / INDEX) as f:
        f.write((json.dumps(index, indent=2) + "\n").encode())


def read_index(folder: str | Path) -> dict:
    """Read and check a cache's index; every problem is a UserError saying what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"token cache {str(folder)!r} does not exist; build one with `aitextgen-batch prepare`")
    path = folder / INDEX
    if not path.is_file():
        raise UserError(
            f"{str(folder)!r} is not a token cache: it has no {INDEX} (an interrupted build writes shards but no "
            "index); build one with `aitextgen-batch prepare`"
        )
    try:
        index = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); {REBUILD}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{path} is not an aitextgen-batch token cache index; {REBUILD}")
    if index.get("version") != VERSION:
        raise UserError(
            f"{path} has cache format version {index.get('version')!r}; this aitextgen-batch reads version "
            f"{VERSION}: {REBUILD}"
        )
    missing = [k for k in _INDEX_KEYS if k not in index]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; {REBUILD}")
    if sum(s["num_tokens"] for s in index["shards"]) != index["total_tokens"]:
        raise UserError(f"{path}: the shard token counts do not add up to total_tokens; {REBUILD}")
    return index


def check_shard_file(folder: Path, entry: dict) -> Path:
    """Check that a shard exists with the size the index records (cheap: no read)."""
    path = folder / entry["file"]
    where = f"shard {entry['file']} of token cache {str(folder)!r}"
    if not path.is_file():
        raise UserError(f"{where} is missing: the cache is incomplete; {REBUILD}")
    size = path.stat().st_size
    if size < entry["bytes"]:
        raise UserError(f"{where} is truncated ({size:,} of {entry['bytes']:,} bytes); {REBUILD}")
    if size > entry["bytes"]:
        raise UserError(
            f"{where} has {size:,} bytes but the index records {entry['bytes']:,}: it was changed after the build; "
            + REBUILD
        )
    return path


def _check_digest(folder: Path, entry: dict, digest: str) -> None:
    if digest != entry["sha256"]:
        raise UserError(
            f"shard {entry['file']} of token cache {str(folder)!r} is corrupt: its sha256 {digest[:16]}... does "
            f"not match the index's {entry['sha256'][:16]}...; {REBUILD}"
        )


def verify_shard(folder: Path, entry: dict) -> None:
    """Check a shard's existence, size and sha256 by streaming the file."""
    path = check_shard_file(folder, entry)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    _check_digest(folder, entry, sha.hexdigest())


def read_shard(folder: Path, entry: dict, dtype: str, verify: bool = True):
    """Load one shard as (tokens, offsets): numpy views of the stored bytes; offsets is None unless line_by_line.

    The sha256 is checked on the bytes read unless `verify` is False (they were verified already).
    """
    import msgpack
    import numpy as np

    path = check_shard_file(folder, entry)
    data = path.read_bytes()
    if verify:
        _check_digest(folder, entry, hashlib.sha256(data).hexdigest())
    where = f"shard {entry['file']} of token cache {str(folder)!r}"
    try:
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        shard = msgpack.unpackb(data, raw=False)
    except (OSError, EOFError, zlib.error, ValueError, msgpack.UnpackException) as exc:  # gzip, zlib, msgpack
        raise UserError(f"{where} cannot be decoded ({type(exc).__name__}: {exc}); {REBUILD}") from exc
    if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT or shard.get("dtype") != dtype:
        raise UserError(f"{where} is not a {dtype} token shard of this cache; {REBUILD}")
    tokens = np.frombuffer(shard["tokens"], dtype=np.dtype(dtype).newbyteorder("<"))
    if len(tokens) != entry["num_tokens"] or shard.get("num_tokens") != entry["num_tokens"]:
        raise UserError(f"{where} holds {len(tokens):,} tokens, the index says {entry['num_tokens']:,}; {REBUILD}")
    offsets = None
    if "offsets" in shard:
        offsets = np.frombuffer(shard["offsets"], dtype="<u8")
        if len(offsets) != entry.get("num_samples"):
            raise UserError(f"{where} holds {len(offsets):,} samples, the index says {entry.get('num_samples')}")
    return tokens, offsets
