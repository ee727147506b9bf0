"""The batch-invariant generation engine: every item's text depends on its prompt, seed and params alone.

Why the text cannot depend on the rest of the batch (each point was measured to matter on CPU fp32):
- Shapes: the model only ever runs on fixed shapes, because a matmul's row results change with its row
  count (1, 2-3, 4-6 and >= 7 rows took different kernels). A prefill is (`prefill_rows`, bucket) and a
  decode step is (`slots`, 1) over a cache of `cache_length(bucket, max_new_tokens)` positions; unused
  rows are dummies.
- Layout: a prompt is left-padded to a bucket that depends on its own length, and token `s` of an item
  always sits at cache index `bucket + s` (`kvcache.SlotCache` writes each row at its own position),
  so an item's attention runs over the same keys at the same places whenever and wherever it starts.
- Attention: eager, which is exact row-wise under fixed shapes.
- Randomness: a counter-based draw per (seed, attempt, step) computed on the device
  (`seeds.uniform_tensor`); the token choice (`sampler.sample`) is row-wise with integer prefix sums.
So a row's bits are the same alone, in any batch size, order or subset, and whether or not its slot was
refilled mid-block (`refill`): when an item finishes, the next waiting item of the same cache length
takes its slot at the next check, instead of the slot idling until the whole block ends.

The decode loop (`slots.Decoder`) keeps all per-step work on the device: sampling, eos and length
tracking, and, on CUDA, captured graphs for the step and each prefill width. The host looks every
`check_every` steps, for stop strings (`stops.StopMatcher`, which decodes only new tokens), finished
rows and refills.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import UserError
from ..models.context import context_length
from . import attention, memory
from .params import SamplingParams
from .prompts import length_error, prompt_error, room_error
from .seeds import derive_seed, sample_seed, stream_key
from .stops import StopMatcher

# Re-draws of an empty output (nonempty_output) before giving up and returning the empty text.
MAX_ATTEMPTS = 8
# How many decode steps run between two looks of the host: a look syncs with the device, so on a GPU
# it is rarer; on a CPU it costs nothing and frees finished slots at once.
DEFAULT_CHECK_EVERY = {"cpu": 1, "cuda": 8}
# Versions of the engine's arithmetic: a job made by one cannot be resumed by another.
NUMERICS_VERSION = 3
# Decoders (cache + captured graphs) kept per engine, least recently used dropped first.
MAX_DECODERS = 4


@dataclass
class GenerationResult:
    """One generated sample. `text` is the continuation only; `num_generated_tokens` counts eos."""

    item_index: int
    sample_index: int
    seed: int
    text: str = ""
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    finish_reason: str = "error"  # eos | length | stop | error
    error: str | None = None
    # The generated tokens, the final eos (or stop token id) included when the row ended with one: as many as
    # `token_logprobs`, `num_generated_tokens` of them. The text decodes them without that final token.
    token_ids: list[int] = field(default_factory=list)
    attempts: int = 1
    # Structured output: whether the text satisfies the row's constraint (None without one; False unless it ended at
    # eos), checked on the text itself (`constraints.is_valid`).
    valid: bool | None = None
    # The model's log-softmax (before temperature, top-k, top-p or penalties) of each generated token, eos
    # included (so there are `num_generated_tokens` of them), and their sum.
    token_logprobs: list[float] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    # With `top_logprobs` K: at each generated position, the K most likely tokens under the model (raw logits, as
    # `token_logprobs`), best first, ties by lower id: [[(token id, log-probability), ...], ...].
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # With `prompt_logprobs`: each prompt token's log-probability under the model given the tokens before it (None for
    # the first, which has none before it).
    prompt_logprobs: list[float | None] = field(default_factory=list)


@dataclass
class _Work:
    result: GenerationResult
    prompt_ids: list[int]
    bucket: int
    params: SamplingParams
    matcher: StopMatcher | None
    grammar: str | None = None  # the compiled structured-output constraint (llguidance), if any
    attempt: int = 0
    checked: int = 0  # leading tokens known to hold no stop string


def bucket_length(n: int, limit: int) -> int:
    """Padded prompt length for an n-token prompt: 8, 16, 24, 32, 48, 64, 96, 128, ... capped at `limit`."""
    b = 8
    while b < n:
        b = b + 8 if b < 32 else b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3
    return max(n, min(b, limit))


def cache_length(bucket: int, max_new_tokens: int) -> int:
    """Cache positions for a bucket: room for every new token, rounded up to 64 so few shapes exist."""
    return 64 * math.ceil((bucket + max_new_tokens) / 64)


def default_slots(device: str, weight_bytes: int) -> int:
    """Rows per decode step when none are given, from the device and the model's weights (bytes in the run's dtype).

    A decode step multiplies `slots` rows by every weight matrix: with few rows the time goes to reading the weights
    and to per-step overhead, with many rows to arithmetic, and a step's rows share its cost. On a CPU, 64 rows run a
    small model's matmuls near their best rate (2 threads: 32 rows reach about 80% of it); on a GPU several hundred.
    Larger models take fewer rows: their steps are long anyway, and their KV cache per row is larger.
    CPU: 64 below 1 GB of weights, 32 below 4 GB, else 16. CUDA: 256 below 2 GB, 128 below 16 GB, else 64.
    """
    gb = weight_bytes / 1e9
    if str(device).startswith("cuda"):
        return 256 if gb < 2 else 128 if gb < 16 else 64
    return 64 if gb < 1 else 32 if gb < 4 else 16


def default_prefill_rows(slots: int) -> int:
    """Rows per prefill: an eighth of the slots (at least 2), so a refill waits for few free slots."""
    return min(slots, max(2, slots // 8))


class Engine:
    """Batched, seeded, batch-invariant decoding for any Hugging Face causal LM."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        slots: int | None = None,
        prefill_rows: int | None = None,
        refill: bool = True,
        check_every: int | None = None,
        graphs: bool | None = None,
        self_check: bool = True,
        source: str | None = None,
        folder=None,
    ):
        """Wrap a loaded model (eager attention) and its tokenizer.

        Args:
            slots: rows per decode step (fixed shape; part of the numerics), >= 2.
            prefill_rows: rows per prefill (fixed shape; part of the numerics); default `slots // 8`, >= 2.
            refill: start a waiting item in a slot as soon as its item finishes (never changes any text).
            check_every: decode steps between two looks of the host (never changes any text).
            graphs: capture CUDA graphs (default: on CUDA); eager otherwise.
            self_check: compare a short cached greedy decode against a full forward pass of the model and
                refuse the model if they differ (an architecture the engine cannot serve exactly).
        """
        import torch

        from .slots import ModelRunner

        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.slots = int(slots or default_slots(self.device.type, weight_bytes))
        if self.slots < 2:
            raise UserError(f"slots must be >= 2 (a 1-row matmul takes another kernel path), got {self.slots}")
        self.prefill_rows = int(prefill_rows or default_prefill_rows(self.slots))
        if not 2 <= self.prefill_rows <= self.slots:
            raise UserError(f"prefill_rows must be between 2 and slots ({self.slots}), got {self.prefill_rows}")
        self.refill = bool(refill)
        self.check_every = int(check_every or DEFAULT_CHECK_EVERY.get(self.device.type, 1))
        if graphs and self.device.type != "cuda":
            raise UserError(f"CUDA graphs need a CUDA device; the model is on {self.device.type}")
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        self.source = source
        self._folder = folder
        self._fingerprint: str | None = None
        self._grammar_cache = None
        cfg = model.config
        self.context_length = context_length(cfg)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.eos_id = self.eos_ids[0] if self.eos_ids else None
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._torch = torch
        _refuse_unservable(cfg)
        attention.register()
        model.set_attn_implementation(attention.ATTENTION)
        forward_args = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed `past_key_values` to `cache`; remote-code models may still use the old name.
        cache_kw = "cache" if "cache" in forward_args else "past_key_values"
        keeps_logits = "logits_to_keep" in forward_args or "kwargs" in forward_args
        self._runner = ModelRunner(model, cache_kw, keeps_logits)
        self._decoders: OrderedDict = OrderedDict()
        self._free_bytes = lambda: memory.available_bytes(self.device)
        self.kv_bytes_per_position = 0  # measured on the model (`_self_check` or `_probe`)
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        # warm-up (graph capture) time, decoders built, whether graphs run, and items admitted into a block
        # that was still running (refills) or into an empty one.
        self.stats = {"warmup_seconds": 0.0, "decoders": 0, "graphs": self.graphs, "refills": 0, "admissions": 0}
        if self_check:
            self._self_check()
        else:
            self._probe()

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        device: str | None = None,
        dtype=None,
        *,
        slots: int | None = None,
        prefill_rows: int | None = None,
        refill: bool = True,
        tokenizer=None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
    ) -> Engine:
        """Load `source` (any `load_model` source) with eager attention, ready to generate.

        Args:
            source: model folder, cached hub id, or preset (with `tokenizer`).
            device: default CUDA when available, else CPU.
            dtype: default `models.loading.default_dtype_name(device)`: fp32 on CPU, bf16 on CUDA.
            slots: rows per decode step (fixed shape). Part of the numerics: keep it to replay rows.
            prefill_rows: rows per prefill (fixed shape). Part of the numerics too.
            refill: refill finished slots at once (speed only; never changes any text).

        torch's CPU thread count is process-wide: set it in the entry point. On CPU it can change a row's last bits
        (a matmul may split its sums across threads; seen in logits and log-probabilities), so a job records it with
        each shard and replay uses it; on CUDA it does not matter.
        """
        from ..models.loading import load_model, resolve_source

        model, tok = load_model(
            source,
            device=device,
            dtype=dtype,
            tokenizer=tokenizer,
            attn_implementation="eager",
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )
        resolved = resolve_source(source)
        return cls(
            model,
            tok,
            slots=slots,
            prefill_rows=prefill_rows,
            refill=refill,
            source=resolved.source,
            folder=resolved.folder,
        )

    @property
    def _grammars(self):
        """The structured-output compiler for this tokenizer (built on first use: about 0.4 s)."""
        if self._grammar_cache is None:
            from .constraints import Grammars

            self._grammar_cache = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammar_cache

    @property
    def fingerprint(self) -> str:
        """The model fingerprint (weights, config, tokenizer), computed once."""
        if self._fingerprint is None:
            from ..models.fingerprint import model_fingerprint

            self._fingerprint = model_fingerprint(self.model, self.tokenizer, self._folder)
        return self._fingerprint

    def describe(self) -> dict:
        """What determines this engine's numerics, for manifests and replay."""
        from ..models.loading import dtype_name

        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "device": self.device.type,
            "dtype": dtype_name(self.dtype),
            "slots": self.slots,
            "prefill_rows": self.prefill_rows,
            "numerics": NUMERICS_VERSION,
        }

    # ---------------------------------------------------------------- encoding

    def _encode(self, prompts: Sequence, params: Sequence[SamplingParams]) -> list[tuple[list[int] | None, str | None]]:
        """Each prompt's token ids (with its params' prefix, bos and truncation), or the row's error."""
        bad = {i: err for i, p in enumerate(prompts) if (err := prompt_error(p, allow_empty=True)) is not None}
        texts = [
            "" if i in bad else p.prefix + prompt for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))
        ]
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out = []
        for i, (ids, p) in enumerate(zip(enc, params, strict=True)):
            ids = list(ids)
            if p.prepend_bos or not ids:
                ids = [self.bos_id] + ids
            err = bad.get(i) or room_error(p.max_new_tokens, self.context_length)
            if err is None and p.truncate != "left":
                err = length_error(len(ids), p.max_new_tokens, self.context_length)
            out.append((None, err) if err else (ids[-(self.context_length - p.max_new_tokens) :], None))
        return out

    # ---------------------------------------------------------------- generation

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        batch_size: int = 64,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt; returns results item-major (item 0's samples first), in input order.

        Args:
            prompts: prompt strings (a non-string becomes a per-row error result).
            seeds: one seed per prompt; default `derive_seed(0, index)`.
            params: sampling parameters: one for every prompt (default `SamplingParams()`), or one per prompt.
                A row's text depends on its own params only, whatever its neighbours use.
            batch_size: prompts tokenized together. It changes no text, and no slot waits for it: every item of the
                call is queued at once and slots are refilled across the whole call.
            on_progress: called with (results finished, tokens generated) whenever results finish.
        """
        from .slots import no_grad

        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if batch_size < 1:
            raise UserError(f"batch_size (--batch-size) must be >= 1, got {batch_size}")
        if seeds is None:
            seeds = [derive_seed(0, i) for i in range(len(prompts))]
        if not len(seeds) == len(params) == len(prompts):
            raise UserError(
                f"got {len(prompts)} prompts, {len(seeds)} seeds and {len(params)} params: pass one of each per prompt"
            )
        matchers: dict[tuple, StopMatcher] = {}
        results: list[GenerationResult] = []
        work: list[_Work] = []
        encoded = [
            e
            for start in range(0, len(prompts), batch_size)
            for e in self._encode(prompts[start : start + batch_size], params[start : start + batch_size])
        ]
        for i, ((ids, err), seed, p) in enumerate(zip(encoded, seeds, params, strict=True)):
            matcher = None
            if p.stop:
                key = (tuple(p.stop), p.skip_special_tokens)
                if key not in matchers:
                    matchers[key] = StopMatcher(self.tokenizer, *key)
                matcher = matchers[key]
            for k in range(p.num_return_sequences):
                r = GenerationResult(i, k, sample_seed(int(seed), k))
                results.append(r)
                grammar = None
                if err is None and p.constraint is not None:
                    grammar, err = self._grammars.compile(*p.constraint)
                if err is not None:
                    r.error, r.finish_reason, r.attempts = err, "error", 0
                else:
                    r.num_prompt_tokens = len(ids)
                    bucket = bucket_length(len(ids), self.context_length - p.max_new_tokens)
                    work.append(_Work(r, ids, bucket, p, matcher, grammar))
        progress = _Progress(len(results) - len(work), on_progress)
        if work:
            with no_grad():
                self._run(work, progress)
                self._prompt_logprobs([w for w in work if w.params.prompt_logprobs])
        return results

    def _prompt_logprobs(self, work: list[_Work]) -> None:
        """Each prompt token's log-probability under the model, for the items that ask: a plain forward pass (no
        cache) of `prefill_rows` x bucket, the prefill's fixed shape, so a row's numbers never depend on its
        neighbours; each item's prompt once, whatever its samples."""
        import torch

        from .kvcache import prefill_masks

        seen: dict[int, list] = {}
        by_bucket: dict[int, list[_Work]] = {}
        for w in work:
            if id(w.prompt_ids) not in seen:
                seen[id(w.prompt_ids)] = []
                by_bucket.setdefault(w.bucket, []).append(w)
            seen[id(w.prompt_ids)].append(w)
        for width, group in by_bucket.items():
            for s in range(0, len(group), self.prefill_rows):
                part = group[s : s + self.prefill_rows]
                ids = torch.full((self.prefill_rows, width), self.pad_id, dtype=torch.int64)
                pos = torch.zeros((self.prefill_rows, width), dtype=torch.int64)
                start = torch.full((self.prefill_rows,), width - 1, dtype=torch.int64)
                for r, w in enumerate(part):
                    n = len(w.prompt_ids)
                    ids[r, width - n :] = torch.tensor(w.prompt_ids)
                    pos[r, width - n :] = torch.arange(n)
                    start[r] = width - n
                ids, pos, start = ids.to(self.device), pos.to(self.device), start.to(self.device)
                masks = prefill_masks(self._runner.kinds, start, width, self.dtype)
                logits = self.model(input_ids=ids, attention_mask=masks, position_ids=pos, use_cache=False).logits
                lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None])[..., 0].cpu()
                for r, w in enumerate(part):
                    n = len(w.prompt_ids)
                    values = [None] + lp[r, width - n :].tolist()
                    for same in seen[id(w.prompt_ids)]:
                        same.result.prompt_logprobs = values

    def _run(self, work: list[_Work], progress: _Progress) -> None:
        """Decode `work`: one queue per sampler shape, in order of first appearance."""
        from .sampler import SamplerShape

        queues: dict[object, deque[_Work]] = {}
        for w in work:
            queues.setdefault(SamplerShape.of(w.params, self.vocab_size), deque()).append(w)
        for shape, queue in queues.items():
            queue = self._fit(queue, progress)
            if queue:
                reach = max(_reach(w) for w in queue)
                self._drain(self._decoder(shape, reach, sorted({w.bucket for w in queue})), queue, progress)

    def _budget(self) -> int:
        """Bytes a new decoder may take: the free memory and what the held decoders would give back."""
        return self._free_bytes() + sum(d.nbytes for d in self._decoders.values())

    def _fit(self, queue: deque[_Work], progress: _Progress) -> deque[_Work]:
        """The items whose cache fits in memory at `slots` rows; the others become error rows, with the sizes.

        Raises:
            UserError: the memory cannot even hold a cache for the shortest row (no slot count would run).
        """
        per = self.kv_bytes_per_position
        length = cache_length(max(_reach(w) for w in queue), 0)
        budget = self._budget()
        if memory.cache_bytes(self.slots, length, per) <= memory.USABLE * budget:
            return queue
        fits = memory.fitting_length(self.slots, per, budget)
        kept: deque[_Work] = deque()
        for w in queue:
            need = cache_length(_reach(w), 0)
            if need <= fits:
                kept.append(w)
                continue
            w.result.error = (
                f"prompt ({len(w.prompt_ids)} tokens) and max_new_tokens ({w.params.max_new_tokens}) need a KV cache "
                f"of {memory.describe(self.slots, need, per)}, but {memory.gb(budget)} is free: lower "
                f"max_new_tokens or use fewer slots (--slots {max(2, memory.fitting_slots(need, per, budget))} fits)"
            )
            w.result.finish_reason, w.result.attempts = "error", 0
            progress.done += 1
        return kept

    def _decoder(self, shape, reach: int, widths: list[int]):
        """The decoder for a sampler shape with room for `reach` cache positions, created (and its graphs captured) on
        first use, or rebuilt longer. A row's numbers do not depend on the cache's length (`attention`)."""
        from .slots import Decoder

        length = cache_length(reach, 0)
        dec = self._decoders.pop(shape, None)
        if dec is not None and dec.length < length:
            dec = None
        if dec is None:
            while len(self._decoders) >= MAX_DECODERS:
                self._decoders.popitem(last=False)
            need = memory.cache_bytes(self.slots, length, self.kv_bytes_per_position)
            while self._decoders and self._free_bytes() * memory.USABLE < need:  # least recently used first
                self._decoders.popitem(last=False)
            dec = Decoder(
                self._runner,
                slots=self.slots,
                prefill_rows=self.prefill_rows,
                length=length,
                shape=shape,
                eos_ids=self.eos_ids,
                pad_id=self.pad_id,
                device=self.device,
                graphs=self.graphs,
                pool=self._pool,
            )
            self.stats["decoders"] += 1
        before = dec.warmup_seconds
        dec.prepare(widths, reach)
        self.stats["warmup_seconds"] += dec.warmup_seconds - before
        self.stats["graphs"] = self.graphs and dec.use_graphs
        self._decoders[shape] = dec
        return dec

    def _drain(self, dec, queue: deque[_Work], progress: _Progress) -> None:
        """Run every item of `queue` through `dec`, refilling slots as items finish (if `refill`)."""
        from .slots import Admission

        free = list(range(self.slots - 1, -1, -1))
        active: dict[int, _Work] = {}
        while queue or active:
            # Without refill a block is admitted only when the last one has ended. With it, free slots are
            # filled once a whole prefill's worth is free (a prefill costs the same for 1 row or all).
            wanted = min(self.prefill_rows, len(queue))
            if queue and free and (not active or (self.refill and len(free) >= wanted)):
                batch = []
                for _ in range(min(len(free), len(queue))):
                    w, slot = queue.popleft(), free.pop()
                    active[slot] = w
                    key = stream_key(w.result.seed, w.attempt)
                    grammar = self._grammars.matcher(w.grammar) if w.grammar else None
                    batch.append((slot, Admission(w.prompt_ids, w.bucket, key, w.params, grammar)))
                dec.admit(batch)
                self.stats["refills" if len(active) > len(batch) else "admissions"] += len(batch)
            dec.steps(self.check_every)
            polled = dec.poll()
            stopped = []
            for slot, (reason, n) in self._ended(polled, active).items():
                w = active.pop(slot)
                free.append(slot)
                if reason == "stop" and polled.alive[slot]:
                    stopped.append(slot)
                steps = int(polled.steps[slot]) if reason == "eos" else n  # the eos token is generated, not text
                self._finish(w, polled.tokens[slot, :steps].tolist(), n, polled.logprobs[slot, :steps].tolist(), reason)
                if dec.top_ids is not None:
                    w.result.top_logprobs = dec.top_of(slot, steps)
                progress.tokens += w.result.num_generated_tokens
                if self._redraw(w):
                    w.attempt, w.checked = w.attempt + 1, 0
                    queue.append(w)
                else:
                    progress.done += 1
            dec.stop_rows(stopped)
            progress.report()

    @staticmethod
    def _ended(polled, active: dict[int, _Work]) -> dict[int, tuple[str, int]]:
        """{slot: (finish reason, tokens in the text)} for the active slots whose item has ended."""
        from .slots import EOS

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

    @staticmethod
    def _redraw(w: _Work) -> bool:
        return w.params.nonempty_output and not w.result.text.strip() and w.attempt + 1 < MAX_ATTEMPTS

    def _finish(self, w: _Work, token_ids: list[int], n_text: int, logprobs: list[float], reason: str) -> None:
        """Record a finished item: `token_ids` generated (a final eos included), the first `n_text` of them its text."""
        r, p = w.result, w.params
        text = self.tokenizer.decode(token_ids[:n_text], skip_special_tokens=p.skip_special_tokens)
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

            r.valid = is_valid(p, text, token_ids, reason, self._grammars)

    # ---------------------------------------------------------------- self-check

    def _probe(self) -> None:
        """Measure the KV cache's bytes per (slot, position) with a one-token prefill (what `_self_check` does too)."""
        from .sampler import SamplerShape
        from .slots import Admission, Decoder, no_grad

        shape = SamplerShape(self.vocab_size, self.vocab_size, False, False)
        dec = Decoder(
            self._runner,
            slots=2,
            prefill_rows=2,
            length=64,
            shape=shape,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            device=self.device,
            graphs=False,
        )
        with no_grad():
            dec.admit([(0, Admission([self.bos_id], 8, 0, SamplingParams(max_new_tokens=1)))])
        self.kv_bytes_per_position = dec.cache.nbytes // ((dec.slots + 1) * dec.length)

    def _self_check(self, steps: int = 4) -> None:
        """Refuse a model whose cached, padded decode differs from its own full forward pass.

        A short greedy decode through the real prefill/decode path (left padding, per-row cache writes,
        ready-made masks, sliding windows) is compared, logit by logit, with one plain forward pass over
        the same tokens. An architecture whose layers do not go through the cache or masks the way the
        engine assumes would give wrong text; it is refused instead.
        """
        import torch

        from .sampler import SamplerShape
        from .slots import Admission, Decoder, no_grad

        windows = [w for w in self._runner.kinds.by_kind.values() if w]
        n = max(24, 2 * max(windows) + 8) if windows else 24
        n = max(2, min(n, 512, self.context_length - steps - 1))
        ids = [(i * 7919 + 13) % self.vocab_size for i in range(n)]
        bucket = bucket_length(n, n)
        params = SamplingParams(max_new_tokens=steps, min_new_tokens=steps, temperature=0, nonempty_output=False)
        with no_grad():
            try:
                dec = Decoder(
                    self._runner,
                    slots=2,
                    prefill_rows=2,
                    length=cache_length(bucket, steps),
                    shape=SamplerShape(self.vocab_size, self.vocab_size, False, False),
                    eos_ids=self.eos_ids,
                    pad_id=self.pad_id,
                    device=self.device,
                    graphs=False,
                )
                dec.admit([(0, Admission(ids, bucket, 0, params))])
                self.kv_bytes_per_position = dec.cache.nbytes // ((dec.slots + 1) * dec.length)
                got = [dec.logits[0].clone()]
                for _ in range(steps - 1):
                    dec.steps(1)
                    got.append(dec.logits[0].clone())
                fed = ids + dec.tokens[0, : steps - 1].tolist()
                self.model.set_attn_implementation("eager")  # the reference: the model's own attention
                try:
                    want = self.model(torch.tensor([fed], device=self.device)).logits[0, n - 1 :].float()
                finally:
                    self.model.set_attn_implementation(attention.ATTENTION)
            except (RuntimeError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
                raise UserError(
                    f"model type {self.model.config.model_type!r} cannot run in the batch-invariant engine: "
                    f"its forward pass failed with a per-row cache and explicit masks ({type(exc).__name__}: {exc})"
                ) from exc
        got = torch.stack(got)
        err = float(((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-6)).max())
        tolerance = 1e-4 if self.dtype == torch.float32 else 5e-2
        if not err <= tolerance:
            raise UserError(
                f"model type {self.model.config.model_type!r} cannot be served exactly by the batch-invariant "
                f"engine: its cached, padded decode differs from a full forward pass (relative error {err:.2g} > "
                f"{tolerance:g}); it would produce wrong text, so it is refused"
            )


class _Progress:
    """Counts finished results and generated tokens; reports to the caller's callback when they change."""

    def __init__(self, done: int, callback: Callable[[int, int], None] | None):
        self.done, self.tokens, self.callback = done, 0, callback
        self._reported = (-1, -1)

    def report(self) -> None:
        if self.callback and (self.done, self.tokens) != self._reported:
            self._reported = (self.done, self.tokens)
            self.callback(self.done, self.tokens)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a row: the tokenizer's eos first, then the ones the model's generation config lists (an
    instruct model often has several: Llama 3's `<|eot_id|>` and `<|end_of_text|>`, Qwen2.5's `<|im_end|>` and
    `<|endoftext|>`). Without a generation config, the model config's."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if source is not None:
            ids += list(source) if isinstance(source, (list, tuple)) else [source]
            break
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _reach(w: _Work) -> int:
    """Cache positions an item can fill: its bucket and every token it may generate."""
    return w.bucket + w.params.max_new_tokens


def _refuse_unservable(config) -> None:
    """Architectures whose attention bias is built from a 2D padding mask (ALiBi) cannot take our masks."""
    if getattr(config, "alibi", False) or getattr(config, "use_alibi", False) or config.model_type in ("bloom", "mpt"):
        raise UserError(
            f"model type {config.model_type!r} uses ALiBi position biases, which the batch-invariant engine "
            "cannot serve with its per-row cache"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"model type {config.model_type!r} is an encoder-decoder; the engine serves causal LMs")
