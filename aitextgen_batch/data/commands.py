"""`aitextgen-batch prepare` (build a token cache) and `aitextgen-batch info CACHE` (describe and verify one)."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import check, check_at_most, check_range
from ..errors import UserError
from .cache import INDEX, read_index, verify_shard

MAX_SHARDS = 100_000
MAX_BATCH_TEXTS = 1_000_000


@dataclass
class PrepareConfig:
    """Tokenize text, CSV, Parquet or JSONL files into a sharded token cache for finetuning."""

    input: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "files: text (one document each), .csv/.tsv, .parquet, .jsonl; text/CSV/JSONL may be .gz"},
    )
    tokenizer: Path | None = dataclasses.field(
        default=None, metadata={"help": "tokenizer folder (a model folder holds one): use the model's"}
    )
    output: str | None = dataclasses.field(
        default=None, metadata={"help": "cache folder to create (new or empty); a local path or s3://... URI"}
    )
    num_shards: int = dataclasses.field(
        default=8, metadata={"help": "shards, balanced by tokens; at least the number of training workers"}
    )
    line_by_line: bool = dataclasses.field(
        default=False, metadata={"help": "each non-blank line (or row) is a sample ending in eos"}
    )
    column: str | None = dataclasses.field(default=None, metadata={"help": "CSV/Parquet column that holds the text"})
    field: str | None = dataclasses.field(default=None, metadata={"help": "JSONL key that holds the text"})
    compress: bool = dataclasses.field(default=True, metadata={"help": "gzip the shards"})
    batch_size: int = dataclasses.field(default=1000, metadata={"help": "texts per tokenizer call, >= 1"})

    def __post_init__(self):
        check(bool(self.input), "input", "needs at least one file to tokenize")
        check(self.tokenizer is not None, "tokenizer", "is required: the folder of the tokenizer the model uses")
        check(self.output is not None, "output", "is required: the cache folder to create")
        check_range("num_shards", self.num_shards, 1)
        check_at_most("num_shards", self.num_shards, MAX_SHARDS)
        check_range("batch_size", self.batch_size, 1)
        check_at_most("batch_size", self.batch_size, MAX_BATCH_TEXTS)
        check(self.column != "", "column", "must not be empty")
        check(self.field != "", "field", "must not be empty")


def run_prepare(cfg: PrepareConfig) -> int:
    """Build the cache `cfg` describes and print a one-line summary."""
    from .build import build_cache

    start = time.perf_counter()
    index = build_cache(
        cfg.input,
        cfg.tokenizer,
        cfg.output,
        num_shards=cfg.num_shards,
        line_by_line=cfg.line_by_line,
        column=cfg.column,
        field=cfg.field,
        compress=cfg.compress,
        batch_size=cfg.batch_size,
    )
    seconds = time.perf_counter() - start
    read_mb = sum(Path(p).stat().st_size for p in cfg.input if Path(p).exists()) / 1e6
    cache_mb = sum(s["bytes"] for s in index["shards"]) / 1e6
    samples = f", {index['total_samples']:,} samples" if cfg.line_by_line else ""
    print(
        f"wrote token cache {cfg.output}: {index['total_tokens']:,} tokens ({index['dtype']}){samples} in "
        f"{len(index['shards'])} shards, {cache_mb:.1f} MB from {read_mb:.1f} MB of input "
        f"in {seconds:.1f} s ({read_mb / max(seconds, 1e-9):.1f} MB/s)"
    )
    return 0


def is_token_cache(path: str | Path) -> bool:
    """Whether `path` (a folder or URI) is a token cache (has an index), so `info` describes it, not a model."""
    from ..storage import Location, is_uri

    if is_uri(path):
        return Location(path).exists(INDEX)
    return (Path(path) / INDEX).is_file()


def run_cache_info(path: str | Path) -> int:
    """Print a cache's index and verify every shard's checksum.

    Returns:
        0 when every shard is present and intact; 1 (after naming each bad shard on stderr) otherwise.
    """
    from ..console import print_table
    from ..storage import local_copy

    path = local_copy(str(path), "token-cache")  # an object-store cache is checked on a local copy
    try:
        index = read_index(path)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    shards = index["shards"]
    counts = [s["num_tokens"] for s in shards]
    rows = {
        "cache": str(path),
        "format": f"{index['format']} v{index['version']}",
        "tokenizer fingerprint": index["tokenizer_fingerprint"],
        "vocab size": index["vocab_size"],
        "token dtype": index["dtype"],
        "line_by_line": index["line_by_line"],
        "total tokens": index["total_tokens"],
        **({"total samples": index["total_samples"]} if index["line_by_line"] else {}),
        "shards": f"{len(shards)} ({min(counts):,} to {max(counts):,} tokens each)",
        "compressed": index.get("compressed"),
        "size on disk": f"{sum(s['bytes'] for s in shards) / 1e6:.2f} MB",
    }
    source = index.get("source", {})
    if "inputs" in source:
        rows["inputs"] = ", ".join(source["inputs"])
    if "merged_from" in source:
        rows["merged from"] = ", ".join(source["merged_from"])
    print_table(rows, title=f"token cache {path}")
    bad = []
    for entry in shards:
        try:
            verify_shard(path, entry)
        except UserError as exc:
            bad.append(str(exc))
    for message in bad:
        print(f"error: {message}", file=sys.stderr)
    if bad:
        print(f"{len(bad)} of {len(shards)} shards failed verification", file=sys.stderr)
        return 1
    print(f"all {len(shards)} shards verified (sha256)")
    return 0
