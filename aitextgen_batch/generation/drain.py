"""The engine's drain loop: admit waiting items into free slots, step, look, finish what ended, refill.

`drain` runs one queue of items (one sampler shape) through one `slots.Decoder`: free slots take waiting items a
prefill's worth at a time (a prefill costs the same for 1 row or all), the decoder runs `check_every` steps, and the
host looks: stop strings (`stops.StopMatcher`, on new tokens only), rows that ended (eos, length), redraws of empty
results (`nonempty_output`). A row's bits never depend on when it was admitted or beside whom (`engine` docstring).
"""

from __future__ import annotations

from collections import deque

from .seeds import stream_key
from .slots import EOS, Admission
from .stops import StopMatcher
from .work import WorkItem, redraw


def drain(engine, dec, queue: deque[WorkItem]) -> None:
    """Run every item of `queue` through `dec`, refilling slots as items finish (if `refill`)."""
    free = list(range(engine.slots - 1, -1, -1))
    active: dict[int, WorkItem] = {}
    while queue or active:
        # Without refill a block is admitted only when the last one has ended. With it, free slots are
        # filled once a whole prefill's worth is free (a prefill costs the same for 1 row or all).
        wanted = min(engine.prefill_rows, len(queue))
        if queue and free and (not active or (engine.refill and len(free) >= wanted)):
            batch = []
            for _ in range(min(len(free), len(queue))):
                w, slot = queue.popleft(), free.pop()
                active[slot] = w
                key = stream_key(w.result.seed, w.attempt)
                grammar = engine._grammars.matcher(w.grammar) if w.grammar else None
                batch.append((slot, Admission(w.prompt_ids, w.bucket, key, w.params, grammar)))
            dec.admit(batch)
            engine.stats["refills" if len(active) > len(batch) else "admissions"] += len(batch)
        dec.steps(engine.check_every)
        polled = dec.poll()
        stopped = []
        for slot, (reason, n) in ended(polled, active).items():
            w = active.pop(slot)
            free.append(slot)
            if reason == "stop" and polled.alive[slot]:
                stopped.append(slot)
            steps = int(polled.steps[slot]) if reason == "eos" else n  # the eos token is generated, not text
            finish(engine, w, polled.tokens[slot, :steps].tolist(), n, polled.logprobs[slot, :steps].tolist(), reason)
            if dec.top_ids is not None:
                w.result.top_logprobs = dec.top_of(slot, steps)
            if redraw(w):
                w.attempt, w.checked = w.attempt + 1, 0
                queue.append(w)
        dec.stop_rows(stopped)


def ended(polled, active: dict[int, WorkItem]) -> dict[int, tuple[str, int]]:
    """{slot: (finish reason, tokens in the text)} for the active slots whose item has ended."""
    slots = list(active)
    alive = polled.alive[slots]
    eos = ~alive & (polled.finish[slots] == EOS)
    ends = (polled.steps[slots] - eos).tolist()  # eos is counted, never part of the text
    stops: list[int | None] = [None] * len(slots)
    by_matcher: dict[StopMatcher, list[int]] = {}
    for j, s in enumerate(slots):
        if active[s].matcher is not None:
            by_matcher.setdefault(active[s].matcher, []).append(j)
    for matcher, rows in by_matcher.items():
        found = matcher.first_stops(
            [polled.tokens[slots[j]] for j in rows],
            [active[slots[j]].checked for j in rows],
            [ends[j] for j in rows],
        )
        for j, n in zip(rows, found, strict=True):
            stops[j] = n
            active[slots[j]].checked = ends[j]
    ended = {}
    for j, s in enumerate(slots):
        if stops[j] is not None:
            ended[s] = ("stop", stops[j])
        elif not alive[j]:
            ended[s] = ("eos" if eos[j] else "length", ends[j])
    return ended


def finish(engine, w: WorkItem, token_ids: list[int], n_text: int, logprobs: list[float], reason: str) -> None:
    """Record a finished item: `token_ids` generated (a final eos included), the first `n_text` of them its text."""
    r, p = w.result, w.params
    text = engine.tokenizer.decode(token_ids[:n_text], skip_special_tokens=p.skip_special_tokens)
    if reason == "stop":
        text = w.matcher.cut(text)
    if p.lstrip:
        text = text.lstrip()
    r.text, r.token_ids, r.finish_reason, r.error = text, token_ids, reason, None
    r.num_generated_tokens = len(token_ids)
    r.token_logprobs, r.cumulative_logprob = logprobs, float(sum(logprobs))
    r.attempts = w.attempt + 1
    if w.grammar is not None:
        from .constraints import is_valid

        r.valid = is_valid(p, text, token_ids, reason, engine._grammars)
