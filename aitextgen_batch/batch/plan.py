"""Deterministic shard plan: consecutive runs of `shard_rows` input rows, in sorted file order."""

from __future__ import annotations

from .manifest import InputFile, ShardPlan


def plan_shards(files: list[InputFile], shard_rows: int) -> list[ShardPlan]:
    """Cut the concatenated rows of `files` into shards of `shard_rows` rows (the last may be shorter).

    A shard's segments are [file_index, start, end] runs: a shard may span the end of one file and the start of the
    next, so small files still make full shards.
    """
    shards: list[ShardPlan] = []
    cur: list[list[int]] = []
    cur_rows = 0
    for fi, f in enumerate(files):
        start = 0
        while start < f.rows:
            take = min(shard_rows - cur_rows, f.rows - start)
            cur.append([fi, start, start + take])
            cur_rows += take
            start += take
            if cur_rows == shard_rows:
                shards.append(ShardPlan(len(shards), cur_rows, cur))
                cur, cur_rows = [], 0
    if cur_rows:
        shards.append(ShardPlan(len(shards), cur_rows, cur))
    return shards
