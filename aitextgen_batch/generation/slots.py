"""A block of decoding slots: fixed device buffers, prefill and decode steps, optional CUDA graphs.

A `Decoder` owns everything whose shape is fixed for a cache length: the `SlotCache`, the logits of
each slot's next token, and each slot's state (its item's stream key, step counter, positions, sampling
parameters, generated tokens, finish state). One decode step samples every slot's next token on the
device, records it, feeds it back through the model and advances the step counters; the host never
sees a step. It looks every `check_every` steps (`poll`), to see which slots finished, to run the stop
matcher, and to admit waiting items into free slots (`admit`: a prefill of `prefill_rows` rows).

Why a slot's numbers do not depend on when or beside whom its item runs: the prefill always has shape
(prefill_rows, bucket) and the decode step (slots, 1); the item's keys sit at the same cache indices whenever it
starts; its step counter and stream key are its own; every op in the step is row-wise; and the step's attention
reads whole chunks up to the farthest live row (`width`, tracked on the host), which adds exact zeros to a row
whose keys end earlier (`attention`). On CUDA the decode step (once per attention width) and each prefill width are
captured once as CUDA graphs and replayed, since their buffers never move.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .attention import CHUNK
from .kvcache import MaskKinds, SlotCache, decode_masks, prefill_masks
from .params import SamplingParams
from .sampler import RowParams, SamplerShape, sample, top_tokens
from .seeds import to_signed64, uniform_tensor

log = logging.getLogger(__name__)

RUNNING, EOS, LENGTH = 0, 1, 2


@contextmanager
def no_grad():
    """Autograd off and inference mode off, whatever the caller's mode: the decoders' buffers stay ordinary
    tensors that any later call may update, and CUDA graphs captured here do not turn the CUDA generator's
    state into inference tensors (which breaks a later capture outside inference mode, torch issue 166792)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


@dataclass
class Admission:
    """What a slot needs to start an item: its prompt tokens (at most `bucket` long), bucket and stream key."""

    prompt_ids: list[int]
    bucket: int
    key: int
    params: SamplingParams
    matcher: object = None  # the row's llguidance matcher when it has a constraint (`constraints`)


@dataclass
class Polled:
    """Host copies of the slots' state after a poll."""

    alive: np.ndarray  # (slots,) bool
    steps: np.ndarray  # (slots,) tokens generated, eos included
    finish: np.ndarray  # (slots,) RUNNING | EOS | LENGTH
    tokens: np.ndarray  # (slots, length + 1) generated tokens
    logprobs: np.ndarray  # (slots, length + 1) their log-probabilities under the model (float32)


class ModelRunner:
    """Calls a Hugging Face causal LM with a `SlotCache`, explicit positions and ready-made masks."""

    def __init__(self, model, cache_kw: str, keeps_logits: bool):
        self.model = model
        self.cache_kw = cache_kw
        self.keeps_logits = keeps_logits
        self.kinds = MaskKinds(model.config)
        self.dtype = next(model.parameters()).dtype
        self.num_layers = model.config.num_hidden_layers

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, masks, cache: SlotCache) -> torch.Tensor:
        kwargs = {
            "input_ids": ids,
            "attention_mask": masks,
            "position_ids": positions,
            self.cache_kw: cache,
            "use_cache": True,
        }
        if self.keeps_logits:  # the vocabulary projection for the last position only
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits[:, -1, :]


class _PrefillInputs:
    """Static inputs of one prefill width (graphs replay on these exact tensors)."""

    def __init__(self, rows: int, width: int, device):
        self.ids = torch.zeros((rows, width), dtype=torch.int64, device=device)
        self.positions = torch.zeros((rows, width), dtype=torch.int64, device=device)
        self.start = torch.zeros(rows, dtype=torch.int64, device=device)
        self.rows = torch.zeros(rows, dtype=torch.int64, device=device)
        self.graph = None


class Decoder:
    """`slots` decoding rows over caches of `length` positions, for one sampler shape."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        slots: int,
        prefill_rows: int,
        length: int,
        shape: SamplerShape,
        eos_ids: list[int],
        pad_id: int,
        device: torch.device,
        graphs: bool,
        pool=None,
    ):
        self.runner, self.slots, self.prefill_rows, self.length = runner, slots, prefill_rows, length
        self.shape, self.pad_id, self.device = shape, pad_id, device
        self.eos_id = eos_ids[0] if eos_ids else None  # a dummy prefill row's one token
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.int64, device=device)
        self.use_graphs, self.pool = graphs, pool
        s, i64 = slots, dict(dtype=torch.int64, device=device)
        self.cache = SlotCache(runner.num_layers, s, length, device)
        self.logits = torch.zeros((s + 1, shape.vocab), dtype=torch.float32, device=device)
        self.key = torch.zeros(s, **i64)
        self.step = torch.zeros(s, **i64)
        self.base = torch.zeros(s, **i64)  # cache index of the first generated token (= the bucket)
        self.prompt_len = torch.zeros(s, **i64)
        self.alive = torch.zeros(s, dtype=torch.bool, device=device)
        self.finish = torch.zeros(s, **i64)
        self.tokens = torch.zeros((s, length + 1), **i64)
        self.logprobs = torch.zeros((s, length + 1), dtype=torch.float32, device=device)
        self.seen = torch.zeros((s, shape.vocab), dtype=torch.bool, device=device) if shape.penalty else None
        # --top-logprobs: at each step, the K most likely tokens under the model and their log-probabilities
        k = shape.top_logprobs
        self.top_ids = torch.zeros((s, length + 1, k), **i64) if k else None
        self.top_lp = torch.zeros((s, length + 1, k), dtype=torch.float32, device=device) if k else None
        self.params = RowParams(s, device)
        self.params.pad_stop = self.eos_id or 0
        # Structured output: each constrained slot's matcher, and the tokens it allows next (filled on the host).
        self.matchers: list = [None] * s
        self.allow = torch.ones((s, shape.vocab), dtype=torch.bool, device=device) if shape.constrained else None
        self._bitmask = torch.zeros((s, (shape.vocab + 31) // 32), dtype=torch.int32) if shape.constrained else None
        self._prefills: dict[int, _PrefillInputs] = {}
        self._step_graphs: dict[int, object] = {}  # attention width -> captured decode step
        self.warmup_seconds = 0.0
        # The host's bound on each slot's next cache position (its bucket + steps run since it was admitted) and
        # whether its item may still run: a step attends over the chunks that reach the farthest one.
        self.chunk = CHUNK.get(device.type, CHUNK["cuda"])
        self._reach = np.zeros(s, dtype=np.int64)
        self._live = np.zeros(s, dtype=bool)

    @property
    def nbytes(self) -> int:
        """Device bytes of the cache and the per-slot buffers (the captured graphs' workspace not included)."""
        own = (self.logits, self.tokens, self.logprobs, self.seen)
        return self.cache.nbytes + sum(t.nbytes for t in own if t is not None)

    # ------------------------------------------------------------------ the two kernels of work

    def _prefill(self, buf: _PrefillInputs) -> None:
        cache = self.cache
        cache.prefilling, cache.prefill_rows = True, buf.rows
        try:
            masks = prefill_masks(self.runner.kinds, buf.start, buf.ids.shape[1], self.runner.dtype)
            self.logits.index_copy_(0, buf.rows, self.runner(buf.ids, buf.positions, masks, cache).float())
        finally:
            cache.prefilling = False

    def _step(self, width: int) -> None:
        """Sample every slot's next token, record it, and run it through the model, attending over the first `width`
        cache positions (device only)."""
        logits = self.logits[: self.slots]
        draws = uniform_tensor(self.key, self.step)
        # A constraint hides what its grammar does not allow, before temperature, top-k and top-p; the log-probability
        # recorded below stays the model's own.
        allowed = logits if self.allow is None else logits.masked_fill(~self.allow, float("-inf"))
        tok = sample(allowed, draws, self.params, self.shape, self.step, self.eos_ids, self.seen)
        self.tokens.scatter_(1, self.step[:, None], tok[:, None])
        # The model's own log-probability of the token (a per-row reduction over the vocabulary).
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        logprob = logits.gather(1, tok[:, None]) - lse
        self.logprobs.scatter_(1, self.step[:, None], logprob)
        if self.top_ids is not None:
            ids, values = top_tokens(logits, self.shape.top_logprobs)
            rows = torch.arange(self.slots, device=self.device)
            self.top_ids[rows, self.step] = ids
            self.top_lp[rows, self.step] = values - lse
        if self.seen is not None:
            self.seen.scatter_(1, tok[:, None], True)
        ends = self.step + 1 >= self.params.max_new
        code = torch.full_like(self.finish, LENGTH)
        # Any of the model's eos ids, or of the row's own stop token ids (padded with copies of one of them).
        own = ((tok[:, None] == self.params.stop_ids) & self.params.stop_valid).any(dim=-1)
        is_eos = own | (tok[:, None] == self.eos_ids).any(dim=-1)
        ends = ends | is_eos
        code = torch.where(is_eos, EOS, code)
        now = self.alive & ends
        self.finish.copy_(torch.where(now, code, self.finish))
        at = torch.clamp(self.base + self.step, max=self.length - 1)  # finished rows idle in bounds
        self.cache.write_at.copy_(at)
        start = self.base - self.prompt_len
        masks = decode_masks(self.runner.kinds, start, at, width, self.runner.dtype)
        positions = (self.prompt_len + self.step)[:, None]
        self.logits[: self.slots].copy_(self.runner(tok[:, None], positions, masks, self.cache))
        self.step.add_(self.alive.to(torch.int64))
        self.alive.copy_(self.alive & ~now)

    # ------------------------------------------------------------------ graphs

    def _capture(self, fn):
        """Record `fn` (which only touches fixed tensors) as a CUDA graph; None on CPU or if capture fails."""
        if not self.use_graphs:
            return None
        import time

        t0 = time.perf_counter()
        try:
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy allocations and library handles happen outside the capture
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                fn()
        except RuntimeError as exc:  # an op that cannot be captured: stay correct, run eagerly
            log.warning("CUDA graph capture failed (%s); decoding without graphs", exc)
            self.use_graphs = False
            return None
        self.warmup_seconds += time.perf_counter() - t0
        return graph

    def _run_prefill(self, buf: _PrefillInputs) -> None:
        if buf.graph is None and self.use_graphs:
            buf.graph = self._capture(lambda: self._prefill(buf))
        if buf.graph is not None:
            buf.graph.replay()
        else:
            self._prefill(buf)

    def width(self) -> int:
        """Cache positions the next step attends over: whole chunks up to the farthest live slot's next position."""
        reach = int(self._reach[self._live].max()) + 1 if self._live.any() else 1
        return min(self.length, self.chunk * -(-reach // self.chunk))

    def steps(self, n: int) -> None:
        """Run `n` decode steps."""
        for _ in range(n):
            width = self.width()
            graph = self._step_graph(width)
            if self.allow is not None:
                self._fill_masks()
                before = self.step.to("cpu", copy=True)
            if graph is not None:
                graph.replay()
            else:
                self._step(width)
            if self.allow is not None:
                self._consume(before)
            self._reach[self._live] += 1

    def _fill_masks(self) -> None:
        """Each live constrained slot's allowed tokens, from its matcher (host); a matcher in error allows eos only."""
        rows = [s for s in np.nonzero(self._live)[0] if self.matchers[s] is not None]
        if not rows:
            return
        import llguidance.torch

        bm = self._bitmask
        bm.fill_(-1)
        for s in rows:
            m = self.matchers[s]
            if m.is_error():
                bm[s].zero_()
                if self.eos_id is not None:
                    bm[s, self.eos_id // 32] = 1 << (self.eos_id % 32) if self.eos_id % 32 < 31 else -(1 << 31)
            else:
                llguidance.torch.fill_next_token_bitmask(m, bm, int(s))
        bits = np.unpackbits(bm.numpy().view(np.uint8), axis=1, bitorder="little")[:, : self.shape.vocab]
        self.allow.copy_(torch.from_numpy(bits.astype(bool)))

    def _consume(self, before: torch.Tensor) -> None:
        """Feed each live constrained slot's new token to its matcher (the only host sync of a constrained step)."""
        rows = [s for s in np.nonzero(self._live)[0] if self.matchers[s] is not None]
        if rows:
            tokens = self.tokens.to("cpu")
            for s in rows:
                self.matchers[s].consume_token(int(tokens[s, int(before[s])]))

    def _step_graph(self, width: int):
        if not self.use_graphs:
            return None
        if width not in self._step_graphs:
            # Capture runs the step for real: do it while no slot holds an item, then forget its effects.
            assert not bool(self.alive.any()), "capture the decode step before admitting items"
            self._step_graphs[width] = self._capture(lambda: self._step(width))
            self._reset_idle()
        return self._step_graphs[width]

    def prepare(self, widths: list[int], reach: int) -> None:
        """Capture the decode step for every attention width up to `reach` cache positions, and these prefill
        widths, now, before any item runs (no-op without graphs)."""
        if not self.use_graphs:
            return
        for end in range(self.chunk, min(self.length, reach) + self.chunk, self.chunk):
            self._step_graph(min(end, self.length))
        for w in widths:
            if w not in self._prefills:
                self._run_prefill(self._prefill_inputs(w, []))

    def _reset_idle(self) -> None:
        for t in (self.key, self.step, self.base, self.prompt_len, self.finish, self.tokens, self.logprobs):
            t.zero_()
        self.alive.zero_()

    # ------------------------------------------------------------------ host side

    def _prefill_inputs(self, width: int, batch: list[tuple[int, Admission]]) -> _PrefillInputs:
        buf = self._prefills.get(width)
        if buf is None:
            buf = self._prefills[width] = _PrefillInputs(self.prefill_rows, width, self.device)
        ids = np.full((self.prefill_rows, width), self.pad_id, dtype=np.int64)
        pos = np.zeros((self.prefill_rows, width), dtype=np.int64)
        start = np.full(self.prefill_rows, width - 1, dtype=np.int64)
        rows = np.full(self.prefill_rows, self.slots, dtype=np.int64)  # unused rows write the scratch row
        ids[:, -1] = self.eos_id if self.eos_id is not None else self.pad_id  # dummy rows: one token
        for r, (slot, adm) in enumerate(batch):
            n = len(adm.prompt_ids)
            ids[r, width - n :] = adm.prompt_ids
            pos[r, width - n :] = np.arange(n)
            start[r], rows[r] = width - n, slot
        for dst, src in ((buf.ids, ids), (buf.positions, pos), (buf.start, start), (buf.rows, rows)):
            dst.copy_(torch.from_numpy(src))
        return buf

    def admit(self, batch: list[tuple[int, Admission]]) -> None:
        """Start items in free slots: prefill them (`prefill_rows` at a time, grouped by bucket), reset state."""
        by_width: dict[int, list[tuple[int, Admission]]] = {}
        for slot, adm in batch:
            by_width.setdefault(adm.bucket, []).append((slot, adm))
        for width, group in by_width.items():
            for s in range(0, len(group), self.prefill_rows):
                self._run_prefill(self._prefill_inputs(width, group[s : s + self.prefill_rows]))
        slots = torch.tensor([slot for slot, _ in batch], dtype=torch.int64, device=self.device)
        n = len(batch)

        def put(t: torch.Tensor, values) -> None:
            t.index_copy_(0, slots, torch.tensor(values, dtype=t.dtype).to(self.device))

        for slot, a in batch:
            self._reach[slot], self._live[slot] = a.bucket, True
            self.matchers[slot] = a.matcher
        put(self.key, [to_signed64(a.key) for _, a in batch])
        put(self.base, [a.bucket for _, a in batch])
        put(self.prompt_len, [len(a.prompt_ids) for _, a in batch])
        put(self.step, [0] * n)
        put(self.finish, [RUNNING] * n)
        put(self.alive, [True] * n)
        for params in {id(a.params): a.params for _, a in batch}.values():
            same = [slot for slot, a in batch if a.params is params]
            self.params.set_rows(torch.tensor(same, dtype=torch.int64, device=self.device), params)
        if self.seen is not None:
            seen = np.zeros((n, self.shape.vocab), dtype=bool)
            for j, (_, a) in enumerate(batch):
                seen[j, [t for t in a.prompt_ids if t < self.shape.vocab]] = True
            self.seen.index_copy_(0, slots, torch.from_numpy(seen).to(self.device))

    def poll(self) -> Polled:
        """Copy the slots' state to the host (the only synchronisation in the decode loop)."""
        state = (self.alive, self.step, self.finish, self.tokens, self.logprobs)
        polled = Polled(*(t.to("cpu", copy=True).numpy() for t in state))
        self._live &= polled.alive
        return polled

    def top_of(self, slot: int, n: int) -> list[list[tuple[int, float]]]:
        """The first `n` steps' top tokens of a slot: [[(token id, log-probability), ...] best first, ...]."""
        ids = self.top_ids[slot, :n].to("cpu").tolist()
        lps = self.top_lp[slot, :n].to("cpu").tolist()
        return [list(zip(i, lp, strict=True)) for i, lp in zip(ids, lps, strict=True)]

    def stop_rows(self, slots: list[int]) -> None:
        """Mark slots finished (their item hit a stop string); they become free."""
        if slots:
            self._live[slots] = False
            self.alive.index_fill_(0, torch.tensor(slots, dtype=torch.int64, device=self.device), False)
