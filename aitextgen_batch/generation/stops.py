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

    def first_stop(self, token_ids: Sequence[int], checked: int, end: int) -> int | None:
        """The smallest n in (checked, end] whose prefix text `token_ids[:n]` holds a stop, or None.

        Args:
            token_ids: the row's generated tokens (eos excluded up to `end`; any sequence, e.g. a numpy row).
            checked: how many leading tokens are known to hold no stop.
            end: how many tokens the row has generated so far.
        """
        if not self.stops or end <= checked:
            return None
        if self.index(self.decode(token_ids[max(0, checked - self.margin) : end])) is None:
            return None
        for n in range(checked + 1, end + 1):
            if self.index(self.decode(token_ids[:n])) is not None:
                return n
        return None

    def cut(self, text: str) -> str:
        """`text` up to the first stop string (all of it if none)."""
        i = self.index(text)
        return text if i is None else text[:i]
