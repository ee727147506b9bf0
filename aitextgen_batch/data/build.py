"""Build a token cache by streaming inputs through a fast tokenizer, holding neither the corpus nor its tokens.

Pass 1 reads the inputs piece by piece (`inputs.py`), encodes them in batches with the Rust tokenizer (which
spreads a batch over all cores) and appends the ids, with eos after every document, to a raw spill file in the
output folder; line_by_line builds also spill each sample's start. Pass 2 knows the total, so it cuts the spill into
`num_shards` contiguous, token-balanced shards (at sample boundaries for line_by_line) and packs them in threads
(gzip and sha256 release the GIL). Peak memory depends on the batch size, not on the corpus size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import UserError
from ..storage import is_uri
from .cache import FORMAT, SHARD_FORMAT, VERSION, dtype_for_vocab, shard_name, write_index, write_shard
from .inputs import Piece, check_input, read_documents, text_pieces

CHUNK_CHARS = 1 << 16  # a document larger than this is encoded in pieces of about this size (faster than larger)
BATCH_CHARS = 1 << 20  # encode at most this much text per call: bounds the tokenizer's transient memory
_IO_CHUNK = 1 << 20


def tokenizer_info(tokenizer) -> dict:
    """What a cache records about its tokenizer (and checks against the model's later)."""
    from ..models.fingerprint import tokenizer_fingerprint

    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos token, which ends every document; use one that has (GPT-2 style)")
    pad = tokenizer.pad_token_id
    return {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.eos_token_id if pad is None else pad,
    }


def as_tokenizer(tokenizer):
    """A tokenizer object, loading it first when given a folder."""
    if isinstance(tokenizer, (str, Path)):
        from ..models.loading import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def encode_pieces(pieces: Iterable[Piece], tokenizer, dtype: str, *, line_by_line: bool, batch_size: int):
    """Encode pieces in batches; yield (ids, sample_lengths) arrays per batch (lengths only for line_by_line).

    Special tokens are not added: the only one is the eos after each document, added here.
    """
    import numpy as np
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy, free of padding and truncation
    backend.no_padding()
    backend.no_truncation()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    eos = tokenizer.eos_token_id

    def run(texts: list[str], ends: list[bool]):
        flat: list[int] = []
        lengths = []
        for enc, end in zip(encode(texts, add_special_tokens=False), ends):
            ids = enc.ids
            flat.extend(ids)
            if end:
                flat.append(eos)
            lengths.append(len(ids) + 1)  # line_by_line pieces are whole samples: every one ends
        return np.array(flat, dtype=dtype), np.array(lengths, dtype=np.uint64) if line_by_line else None

    texts, ends, chars = [], [], 0
    for text, end in pieces:
        texts.append(text)
        ends.append(end)
        chars += len(text)
        if len(texts) >= batch_size or chars >= BATCH_CHARS:
            yield run(texts, ends)
            texts, ends, chars = [], [], 0
    if texts:
        yield run(texts, ends)


class CacheWriter:
    """Collect token ids (and sample lengths) in spill files, then cut them into shards and write the index last.

    Use as a context manager: on an error, the spill files and any shard written are removed.
    """

    def __init__(self, output: str | Path, info: dict, *, line_by_line: bool, compress: bool = True):
        self.output = Path(output)
        if self.output.exists() and (not self.output.is_dir() or any(self.output.iterdir())):
            raise UserError(f"--output {str(self.output)!r} exists and is not empty; choose a new folder")
        self.info, self.line_by_line, self.compress = info, line_by_line, compress
        self.dtype = dtype_for_vocab(info["vocab_size"])
        self.num_tokens = self.num_samples = 0
        self._written: list[Path] = []
        self._created = not self.output.exists()
        self.output.mkdir(parents=True, exist_ok=True)
        self._spill = self.output / f".tokens-{os.getpid()}.spill"
        self._starts = self.output / f".starts-{os.getpid()}.spill"
        self._tok_f = open(self._spill, "wb")
        self._starts_f = open(self._starts, "wb") if line_by_line else None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._tok_f.close()
        if self._starts_f:
            self._starts_f.close()
        self._spill.unlink(missing_ok=True)
        self._starts.unlink(missing_ok=True)
        if exc_type is not None:
            for p in self._written:
                p.unlink(missing_ok=True)
            if self._created and not any(self.output.iterdir()):
                self.output.rmdir()

    def add(self, tokens, sample_lengths=None) -> None:
        """Append ids; for line_by_line also the length of each sample they hold, in order."""
        import numpy as np

        self._tok_f.write(np.ascontiguousarray(tokens, dtype=np.dtype(self.dtype).newbyteorder("<")).tobytes())
        if self.line_by_line:
            lengths = np.asarray(sample_lengths, dtype=np.uint64)
            starts = self.num_tokens + np.cumsum(lengths) - lengths
            self._starts_f.write(starts.astype("<u8").tobytes())
            self.num_samples += len(lengths)
        self.num_tokens += len(tokens)

    def finish(self, num_shards: int, extra: dict | None = None) -> dict:
        """Cut the spill into `num_shards` shards, write them and then the index; return the index."""
        from .. import __version__

        self._tok_f.close()
        if self._starts_f:
            self._starts_f.close()
        units = self.num_samples if self.line_by_line else self.num_tokens
        if units < num_shards:
            what = "samples" if self.line_by_line else "tokens"
            raise UserError(
                f"the input holds only {units:,} {what}, too few for {num_shards} shards; lower --num-shards"
            )
        token_cuts, sample_cuts = self._cuts(num_shards)
        with ThreadPoolExecutor(max_workers=min(num_shards, os.cpu_count() or 1)) as pool:
            jobs = [pool.submit(self._write_one, k, token_cuts, sample_cuts) for k in range(num_shards)]
            shards = [j.result() for j in jobs]
        index = {
            "format": FORMAT,
            "version": VERSION,
            "created_by": f"aitextgen-batch {__version__}",
            **self.info,
            "dtype": self.dtype,
            "line_by_line": self.line_by_line,
            "compressed": self.compress,
            "total_tokens": self.num_tokens,
            **({"total_samples": self.num_samples} if self.line_by_line else {}),
            "shards": shards,
            **(extra or {}),
        }
        write_index(self.output, index)
        return index

    def _cuts(self, k: int) -> tuple[list[int], list[int] | None]:
        """Token boundaries of k balanced shards; for line_by_line, moved to the sample start at or after each."""
        import numpy as np

        n = self.num_tokens
        if not self.line_by_line:
            return [i * n // k for i in range(k + 1)], None
        targets = [i * n / k for i in range(1, k)]
        found: list[int] = []  # sample index of the first start >= each target, in one streamed pass
        with open(self._starts, "rb") as f:
            base = 0
            while len(found) < len(targets):
                starts = np.fromfile(f, dtype="<u8", count=1 << 20)
                if not len(starts):
                    break
                pos = np.searchsorted(starts, targets[len(found) :], side="left")
                found.extend(base + int(p) for p in pos[pos < len(starts)])
                base += len(starts)
        found += [self.num_samples] * (len(targets) - len(found))
        samples = [0]
        for i, s in enumerate(found, 1):  # every shard keeps at least one sample
            samples.append(min(max(s, samples[-1] + 1), self.num_samples - (k - i)))
        samples.append(self.num_samples)
        tokens = [self._sample_start(s) for s in samples[:-1]] + [n]
        return tokens, samples

    def _sample_start(self, i: int) -> int:
        with open(self._starts, "rb") as f:
            f.seek(8 * i)
            return int.from_bytes(f.read(8), "little")

    def _write_one(self, k: int, token_cuts: list[int], sample_cuts: list[int] | None) -> dict:
        import numpy as np

        lo, hi = token_cuts[k], token_cuts[k + 1]
        width = np.dtype(self.dtype).itemsize
        header = {"format": SHARD_FORMAT, "version": VERSION, "shard": k, "dtype": self.dtype, "num_tokens": hi - lo}
        blobs = []
        if sample_cuts is not None:
            s0, s1 = sample_cuts[k], sample_cuts[k + 1]
            header["num_samples"] = s1 - s0
            offsets = (
                (np.frombuffer(b, dtype="<u8") - np.uint64(lo)).astype("<u8").tobytes()
                for b in _read_range(self._starts, 8 * s0, 8 * (s1 - s0))
            )
            blobs.append(("offsets", 8 * (s1 - s0), offsets))
        blobs.append(("tokens", width * (hi - lo), _read_range(self._spill, width * lo, width * (hi - lo))))
        path = self.output / shard_name(k, self.compress)
        self._written.append(path)
        entry = write_shard(path, header, blobs, self.compress)
        return {"file": entry["file"], "num_tokens": hi - lo, **_samples(header), **entry}


def _samples(header: dict) -> dict:
    return {"num_samples": header["num_samples"]} if "num_samples" in header else {}


def _read_range(path: Path, start: int, nbytes: int) -> Iterator[bytes]:
    # Whole multiples of 8 bytes, so each chunk of uint64 offsets decodes on its own.
    with open(path, "rb") as f:
        f.seek(start)
        while nbytes > 0:
            chunk = f.read(min(_IO_CHUNK, nbytes))
            if not chunk:
                raise RuntimeError(f"{path} ended early")
            nbytes -= len(chunk)
            yield chunk


def write_cache(
    pieces: Iterable[Piece],
    tokenizer,
    output: str | Path,
    *,
    num_shards: int,
    line_by_line: bool,
    compress: bool,
    batch_size: int,
    extra: dict,
    empty_message: str,
) -> dict:
    """Encode `pieces` into a new cache at `output`; return its index."""
    info = tokenizer_info(tokenizer)
    with CacheWriter(output, info, line_by_line=line_by_line, compress=compress) as writer:
        for ids, lengths in encode_pieces(
            pieces, tokenizer, writer.dtype, line_by_line=line_by_line, batch_size=batch_size
        ):
            writer.add(ids, lengths)
        if writer.num_tokens == 0:
            raise UserError(empty_message)
        return writer.finish(num_shards, extra)


def build_cache(
    inputs: Iterable[str | Path],
    tokenizer,
    output: str | Path,
    *,
    num_shards: int = 8,
    line_by_line: bool = False,
    column: str | None = None,
    field: str | None = None,
    compress: bool = True,
    batch_size: int = 1000,
    chunk_chars: int = CHUNK_CHARS,
) -> dict:
    """Tokenize files into a token cache folder (see `aitextgen-batch prepare`).

    Args:
        inputs: text files (each one document; every non-blank line a sample with `line_by_line`), `.csv`/`.tsv`
            and `.parquet` files (`column`: one document per row), `.jsonl` files (`field`: one per record).
            Text, CSV and JSONL files may be gzipped (`.gz`).
        tokenizer: a tokenizer object or folder; its fingerprint is stored and checked when training.
        output: a new (or empty) folder.
        num_shards: shards to cut the tokens into, balanced by token count.
        line_by_line: keep sample boundaries (each sample ends in eos) so training draws whole samples.
        compress: gzip the shards.
        batch_size: texts per tokenizer call.
        chunk_chars: a document longer than this is encoded in pieces (same ids as whole).

    Returns:
        The index written to `output/index.json`.
    """
    inputs = [str(p) for p in inputs]
    if is_uri(output) or any(is_uri(p) for p in inputs):
        return _build_staged(
            inputs,
            tokenizer,
            output,
            num_shards=num_shards,
            line_by_line=line_by_line,
            column=column,
            field=field,
            compress=compress,
            batch_size=batch_size,
            chunk_chars=chunk_chars,
        )
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError("prepare needs at least one --input file")
    for p in paths:
        check_input(p, column, field)
    tok = as_tokenizer(tokenizer)

    def pieces():
        for p in paths:
            yield from read_documents(p, line_by_line=line_by_line, column=column, field=field, chunk_chars=chunk_chars)

    source = {
        "inputs": [str(p) for p in paths],
        "column": column,
        "field": field,
        "num_shards": num_shards,
        "batch_size": batch_size,
    }
    return write_cache(
        pieces(),
        tok,
        output,
        num_shards=num_shards,
        line_by_line=line_by_line,
        compress=compress,
        batch_size=batch_size,
        extra={"source": source},
        empty_message=(
            f"the inputs hold no text ({', '.join(map(str, paths))}): every file, line or row is empty or blank; "
            "check --column/--field and the files"
        ),
    )


def _build_staged(inputs: list[str], tokenizer, output: str, **options) -> dict:
    """Object-store inputs or output: stream remote inputs to a local temp folder, build the cache locally,
    then upload it with `index.json` last (a cache without its index is never mistaken for a complete one)."""
    import shutil
    import tempfile

    from ..storage import Location, fetch_file, upload_folder

    if is_uri(output) and Location(output).list(recursive=True):
        raise UserError(f"--output {output!r} exists and is not empty; choose a new folder")
    stage = Path(tempfile.mkdtemp(prefix="aitextgen-batch-prepare-"))
    try:
        local_inputs = []
        for i, p in enumerate(inputs):
            if is_uri(p):
                (stage / "in" / str(i)).mkdir(parents=True)
                local_inputs.append(fetch_file(p, stage / "in" / str(i)))
            else:
                local_inputs.append(Path(p))
        local_out = stage / "cache" if is_uri(output) else Path(output)
        index = build_cache(local_inputs, tokenizer, local_out, **options)
        if is_uri(output):
            upload_folder(local_out, output, last=("index.json",))
        return index
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def build_cache_from_texts(
    texts: Iterable[str],
    tokenizer,
    output: str | Path,
    *,
    num_shards: int = 1,
    line_by_line: bool = False,
    compress: bool = True,
    batch_size: int = 1000,
    chunk_chars: int = CHUNK_CHARS,
) -> dict:
    """Tokenize in-memory texts (each a document, or a sample with `line_by_line`) into a token cache."""
    return write_cache(
        text_pieces(texts, line_by_line=line_by_line, chunk_chars=chunk_chars),
        as_tokenizer(tokenizer),
        output,
        num_shards=num_shards,
        line_by_line=line_by_line,
        compress=compress,
        batch_size=batch_size,
        extra={"source": {"texts": "from Python", "num_shards": num_shards}},
        empty_message="the texts hold no text: every one is empty or blank",
    )
