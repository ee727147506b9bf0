"""Local folders and object stores (`s3://`, `gs://`, ...) behind one small interface, via pyarrow filesystems.

Local writes go through a temporary name and a rename. Object stores have no rename, but a PUT is
atomic (an object appears whole or not at all), so there a file is written under its final name; the
job's completion record is still written only after the file it vouches for is complete.

S3 settings come from the usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL for S3-compatible servers such as MinIO).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import UserError


def cache_root() -> Path:
    """The local cache: downloads of remote model folders and token caches, and staged finetunes to object stores.

    `$AITEXTGEN_BATCH_CACHE` when set, else `~/.cache/aitextgen-batch`.
    """
    return Path(os.environ.get("AITEXTGEN_BATCH_CACHE") or Path.home() / ".cache" / "aitextgen-batch")


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary sibling of local file `path` for binary writing; it replaces `path` only if the block succeeds.

    The data is fsynced before the rename (and the folder after it), so after a crash a reader finds the old file or
    the whole new one, never a part. Temporary names start with `.` and end in `.tmp`: readers of a folder skip them.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to local file `path` through `atomic_write`."""
    with atomic_write(path) as f:
        f.write(data)


def is_uri(spec: str | os.PathLike) -> bool:
    return "://" in str(spec) and not str(spec).startswith("file://")


def filesystem(spec: str | os.PathLike):
    """(pyarrow filesystem, path within it) for a local path or a URI."""
    import pyarrow.fs as pafs

    s = str(spec)
    if not is_uri(s):
        return pafs.LocalFileSystem(), os.path.abspath(s.removeprefix("file://"))
    try:
        fs, path = pafs.FileSystem.from_uri(s)
    except (ValueError, OSError) as exc:  # ArrowInvalid (a ValueError): unknown scheme or bad URI; OSError: no access
        raise UserError(f"cannot open {s!r}: {exc}") from exc
    return fs, path.rstrip("/")


class Location:
    """A folder addressed by a local path or a URI; every path method takes names relative to it."""

    def __init__(self, spec: str | os.PathLike):
        import pyarrow.fs as pafs

        self.spec = str(spec)
        self.fs, self.root = filesystem(spec)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        scheme = self.spec.split("://", 1)[0] if is_uri(self.spec) else None
        self.uri = f"{scheme}://{self.root}" if scheme else self.root

    def __str__(self) -> str:
        return self.uri

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if parts else self.root

    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_dir(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.Directory

    def mkdir(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def list(self, *parts: str, pattern: str = "*", recursive: bool = False) -> list[str]:
        """Names (relative to this location) of the files under `parts` matching `pattern`, sorted."""
        return sorted(self.sizes(*parts, pattern=pattern, recursive=recursive))

    def sizes(self, *parts: str, pattern: str = "*", recursive: bool = False) -> dict[str, int]:
        """Name (relative to this location) -> size in bytes of the files under `parts` matching `pattern`."""
        import pyarrow.fs as pafs

        base = self.path(*parts)
        if not self.exists(*parts):
            return {}
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
        out = {}
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(self.root) :].lstrip("/")
            if fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pattern):
                out[rel] = info.size
        return out

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole file so that no reader ever sees part of it (temp + rename locally)."""
        final = self.path(*parts)
        if self.local:
            write_file_atomic(final, data)
        else:
            with self.fs.open_output_stream(final) as f:
                f.write(data)

    def put_file(self, local: str | os.PathLike, *parts: str) -> None:
        """Copy local file `local` here, streamed (1 MiB at a time), as atomically as `write_bytes`."""
        with open(local, "rb") as src:
            if self.local:
                with atomic_write(self.path(*parts)) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            else:
                with self.fs.open_output_stream(self.path(*parts)) as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def delete(self, *parts: str) -> None:
        if self.exists(*parts):
            if self.is_dir(*parts):
                self.fs.delete_dir(self.path(*parts))
            else:
                self.fs.delete_file(self.path(*parts))

    def parquet_file(self, *parts: str):
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.fs.open_input_file(self.path(*parts)))


def split_glob(spec: str) -> tuple[str, str | None]:
    """(the folder before the first path level with a wildcard, the pattern after it), or (spec, None) for no glob."""
    parts = spec.split("/")
    first = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), None)
    if first is None:
        return spec, None
    return "/".join(parts[:first]) or ("/" if spec.startswith("/") else "."), "/".join(parts[first:])


def glob_matches(name: str, pattern: str) -> bool:
    """Whether relative path `name` matches `pattern` as a shell glob would, level by level; bookkeeping names (a level
    starting with `_` or `.`, as a job's `_done/` and temporary files) never match, as in a folder's search."""
    if name.count("/") != pattern.count("/") or any(part.startswith((".", "_")) for part in name.split("/")):
        return False
    return fnmatch.fnmatch(name, pattern)


def expand_inputs(spec: str, patterns: tuple[str, ...] = ("*.parquet",)) -> tuple[list[str], str]:
    """IN (a file, a folder, or a glob; local or URI) as sorted file URIs/paths, and the root they are named from.

    A folder is searched (recursively) for file names matching any of `patterns`. A glob is matched as a shell does:
    from the folder before its first wildcard (the current folder for a bare `*.parquet`), each `*`, `?` or `[...]`
    within one path level (`*.parquet` never reaches into subfolders, `*/*.parquet` reaches one level down).
    """
    base, pattern = split_glob(spec)
    loc = Location(base)
    if pattern is not None:
        depth = pattern.count("/")
        names = [n for n in loc.list(recursive=depth > 0) if glob_matches(n, pattern)]
        return [loc.uri_of(n) for n in names], loc.uri
    if loc.is_dir():
        names = [
            n
            for n in loc.list(recursive=True)
            if any(fnmatch.fnmatch(n.rsplit("/", 1)[-1], p) for p in patterns)
            and not any(part.startswith((".", "_")) for part in n.split("/"))
        ]
        return [loc.uri_of(n) for n in names], loc.uri
    if loc.exists():
        return [loc.uri], loc.uri.rsplit("/", 1)[0]
    raise UserError(f"--input {spec!r} does not exist (pass a Parquet file, a folder of them, or a glob)")


def file_digest(uri: str) -> tuple[int, str]:
    """(size in bytes, sha256) of a local or remote file, streamed 4 MiB at a time."""
    fs, path = filesystem(uri)
    sha = hashlib.sha256()
    size = 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def open_parquet(uri: str):
    fs, path = filesystem(uri)
    import pyarrow.parquet as pq

    return pq.ParquetFile(fs.open_input_file(path))


STAMPS = ".remote-stamps.json"  # in a local copy: each file's [size, mtime_ns] on the store when it was downloaded


def local_copy(uri: str, kind: str = "folder") -> Path:
    """Download a remote folder (a model or a token cache) once into the local cache and return its path.

    The cache key is the URI. A file is downloaded again when its size or modification time on the store changed
    (a finetune rerun republishes weights of the same size under the same URI), and a local file the store no
    longer has is removed. Local paths are returned unchanged.
    """
    import json

    if not is_uri(uri):
        return Path(uri)
    dest = cache_root() / kind / hashlib.sha256(uri.encode()).hexdigest()[:16]
    loc = Location(uri)
    names = loc.list(recursive=True)
    if not names:
        raise UserError(f"{uri} holds no files")
    stamps_file = dest / STAMPS
    try:
        old = json.loads(stamps_file.read_text())
    except (OSError, ValueError):
        old = {}
    stamps = {}
    for name in names:
        info = loc.fs.get_file_info(loc.path(name))
        # no modification time from the store: never trust the local copy
        stamps[name] = [info.size, info.mtime_ns] if info.mtime_ns is not None else None
        target = dest / name
        if stamps[name] is None or old.get(name) != stamps[name] or not target.is_file():
            with loc.fs.open_input_stream(loc.path(name)) as src, atomic_write(target) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    for stale in (p for p in dest.rglob("*") if p.is_file() and p != stamps_file):
        name = stale.relative_to(dest).as_posix()
        if name not in stamps and not (stale.name.startswith(".") and stale.name.endswith(".tmp")):
            stale.unlink(missing_ok=True)
    write_file_atomic(stamps_file, json.dumps(stamps).encode())
    return dest


def upload_folder(local: str | Path, uri: str, last: tuple[str, ...] = ()) -> None:
    """Copy a local folder to `uri`; the names in `last` (e.g. an index) are written after everything else."""
    loc = Location(uri)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)
    for p in files:
        loc.write_bytes(p.read_bytes(), *p.relative_to(local).parts)


def fetch_file(uri: str, dest_dir: str | Path) -> Path:
    """Stream one remote file into `dest_dir` (1 MiB at a time) and return the local path."""
    fs, path = filesystem(uri)
    target = Path(dest_dir) / path.rsplit("/", 1)[-1]
    with fs.open_input_stream(path) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return target
