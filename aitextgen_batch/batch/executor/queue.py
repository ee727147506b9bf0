"""The shards left to run, how they are grouped, and what happens when one fails: the retry rule of every executor."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..manifest import DoneRecord, JobSpec

# Shards given to a worker at once when they are small: until their items fill the slots this many times over.
GROUP_FILL = 2
MAX_GROUP = 64


class ShardQueue:
    """The pending shards of a job, handed out in groups, with the retry rule.

    A group is one shard, or as many small ones as fill a worker's slots `GROUP_FILL` times (a shard of 16 rows on 64
    slots would leave three quarters of every decode step empty), but no more than a fair share of what is queued among
    the workers (a small job still runs on every worker), and at most `MAX_GROUP` shards. A shard that failed is
    retried alone, until it has failed `max_attempts` times, then `on_fail` is told; when a whole group fails (its
    engine call raised, its worker died), its shards are retried alone without counting that attempt against any one
    of them. `retries` counts the shards put back.
    """

    def __init__(
        self,
        job: JobSpec,
        pending: list[int],
        max_attempts: int,
        on_done: Callable[[DoneRecord], None],
        on_fail: Callable[[int, str], None],
    ):
        self.job, self.queue = job, deque(pending)
        self.max_attempts, self.on_done, self.on_fail = max_attempts, on_done, on_fail
        self.attempts: dict[int, int] = {}
        self.solo: set[int] = set()
        self.retries = 0

    def __bool__(self) -> bool:
        return bool(self.queue)

    def take(self, workers: int = 1) -> list[int]:
        """The next group of shards for one of `workers` workers (empty when none is left)."""
        per_row = self.job.identity.sampling.num_return_sequences
        queued = sum(self.job.shards[s].rows for s in self.queue) * per_row
        want = min(GROUP_FILL * self.job.identity.engine.slots, -(-queued // max(1, workers)))
        group, items = [], 0
        while self.queue and len(group) < MAX_GROUP and (not group or items < want):
            if group and self.queue[0] in self.solo:
                break
            s = self.queue.popleft()
            group.append(s)
            items += self.job.shards[s].rows * per_row
            if s in self.solo:
                break
        return group

    def finished(self, outcomes: list) -> None:
        """Record a group's outcomes: done records, or a shard's own failure (`shard.ShardFailure`)."""
        from ..shard import ShardFailure

        for outcome in outcomes:
            if isinstance(outcome, ShardFailure):
                self.failed(outcome.shard, outcome.error)
            else:
                self.on_done(outcome)

    def failed(self, shard: int, error: str) -> None:
        """One failed attempt of `shard`: retried alone, or failed for good after `max_attempts`."""
        self.attempts[shard] = self.attempts.get(shard, 0) + 1
        if self.attempts[shard] >= self.max_attempts:
            self.on_fail(shard, f"failed {self.attempts[shard]} times; last error: {error}")
        else:
            self.retries += 1
            self.solo.add(shard)
            self.queue.appendleft(shard)

    def group_failed(self, group: list[int], error: str) -> None:
        """A whole group failed: one shard's attempt counts; several are retried alone, no attempt counted."""
        if len(group) == 1:
            self.failed(group[0], error)
            return
        for s in reversed(group):
            self.solo.add(s)
            self.queue.appendleft(s)

    def fail_all(self, error: str) -> None:
        """No worker is left to run the queued shards: each is failed with `error`."""
        while self.queue:
            self.on_fail(self.queue.popleft(), error)
