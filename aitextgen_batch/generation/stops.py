"""Stop strings: where a row's text must end, found by decoding only the new tail of its tokens.

The rule (unchanged from the first engine): a row stops at the first token count `n` for which the
decoded text of its first `n` tokens contains a stop string, and its text is that decoded text cut
before the stop's first occurrence. The host looks at rows only every few steps, so a row may have run
past its stop; `first_stop` finds the same `n` whenever it looks, so the text never depends on when
the host checks.

Decoding every row's whole continuation at every check costs O(length) per row; instead the new tokens
are decoded with a margin of earlier tokens wide enough to hold any stop string (`margin`), and only a
row whose tail contains a stop is decoded in full, once per candidate `n`, to confirm it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Finds stop strings in token sequences for one set of stop strings and decode options."""

    def __init__(self, tokenizer, stops: Sequence[str], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.skip_special_tokens = skip_special_tokens
        # A token decodes to at least one byte (or nothing, for skipped specials) and a character takes at
        # most 4 bytes: this many earlier tokens cover the longest stop string plus a split character.
        self.margin = 4 * max((len(s) for s in self.stops), default=0) + 8

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=self.skip_special_tokens)

    def index(self, text: str) -> int | None:
        """Where the first stop string starts in `text`, or None."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def first_stops(self, rows: Sequence[Sequence[int]], checked: Sequence[int], ends: Sequence[int]) -> list:
        """For each row, the smallest n in (checked, end] whose prefix text `row[:n]` holds a stop, or None.

        Args:
            rows: each row's generated tokens (eos excluded up to its end; any sequence, e.g. numpy rows).
            checked: per row, how many leading tokens are known to hold no stop.
            ends: per row, how many tokens it has generated so far.
        """
        found: list[int | None] = [None] * len(rows)
        todo = [i for i in range(len(rows)) if self.stops and ends[i] > checked[i]]
        tails = [[int(t) for t in rows[i][max(0, checked[i] - self.margin) : ends[i]]] for i in todo]
        # One batched call for every row's tail (the fast tokenizer decodes them in parallel).
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=self.skip_special_tokens) if tails else []
        for i, text in zip(todo, texts, strict=True):
            if self.index(text) is not None:  # rare: confirm on whole prefixes, one token count at a time
                found[i] = next(
                    (n for n in range(checked[i] + 1, ends[i] + 1) if self.index(self.decode(rows[i][:n])) is not None),
                    None,
                )
        return found

    def first_stop(self, token_ids: Sequence[int], checked: int, end: int) -> int | None:
        """`first_stops` for one row."""
        return self.first_stops([token_ids], [checked], [end])[0]

    def cut(self, text: str) -> str:
        """`text` up to the first stop string (all of it if none)."""
        i = self.index(text)
        return text if i is None else text[:i]
