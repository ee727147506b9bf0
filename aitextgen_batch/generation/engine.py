"""The batch-invariant generation engine: every item's text depends on its prompt, seed and params alone.

Why the text cannot depend on the rest of the batch (each point was measured to matter on CPU fp32):
- Shapes: the model only ever runs on fixed shapes, because a matmul's row results change with its row
  count (1, 2-3, 4-6 and >= 7 rows took different kernels). A prefill is (`prefill_rows`, bucket) and a
  decode step is (`slots`, 1); unused rows are dummies.
- Layout: a prompt is left-padded to a bucket that depends on its own length, and token `s` of an item
  always sits at cache index `bucket + s` (`kvcache.SlotCache` writes each row at its own position),
  so an item's attention runs over the same keys at the same places whenever and wherever it starts.
- Attention (`attention.slot_attention`): query heads grouped over their key/value head, and a decode step reads
  the cache in fixed-size chunks combined in a fixed order, so a chunk past a row's keys adds exact zeros: a row's
  bits depend neither on its neighbours' lengths nor on the cache's length (`max_new_tokens`).
- Randomness: a counter-based draw per (seed, attempt, step) computed on the device
  (`seeds.uniform_tensor`); the token choice (`sampler.sample`) is row-wise with integer prefix sums.
So a row's bits are the same alone, in any batch size, order or subset, and whether or not its slot was
refilled mid-block (`refill`): when an item finishes, the next waiting item takes its slot at the next check
(`drain`), instead of the slot idling until the whole block ends.

The decode loop (`slots.Decoder`) keeps all per-step work on the device: sampling, eos and length
tracking, and, on CUDA, captured graphs for the step and each prefill width. The host looks every
`check_every` steps, for stop strings (`stops.StopMatcher`, which decodes only new tokens), finished
rows and refills. Memory for a decoder's KV cache is sized before it is allocated (`memory`); the model is checked
at load (`selfcheck`).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict, deque
from collections.abc import Sequence

from ..errors import UserError
from ..models.context import context_length
from . import attention, memory
from .drain import drain
from .logprobs import prompt_logprobs
from .options import engine_shapes
from .params import SamplingParams
from .prompts import length_error, prompt_error, room_error
from .seeds import derive_seed, sample_seed
from .selfcheck import eos_token_ids, probe, refuse_unservable
from .selfcheck import self_check as check_model
from .stops import StopMatcher
from .work import MAX_ATTEMPTS, GenerationResult, WorkItem, bucket_length, cache_length, reach

__all__ = ["Engine", "GenerationResult", "MAX_ATTEMPTS", "bucket_length", "cache_length", "eos_token_ids"]
# How many decode steps run between two looks of the host: a look syncs with the device, so on a GPU
# it is rarer; on a CPU it costs nothing and frees finished slots at once.
DEFAULT_CHECK_EVERY = {"cpu": 1, "cuda": 8}
# Decoders (cache + captured graphs) kept per engine, least recently used dropped first.
MAX_DECODERS = 4


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
        self.slots, self.prefill_rows = engine_shapes(self.device.type, weight_bytes, slots, prefill_rows)
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
        refuse_unservable(cfg)
        attention.register()
        model.set_attn_implementation(attention.ATTENTION)
        forward_args = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed `past_key_values` to `cache`; remote-code models may still use the old name.
        cache_kw = "cache" if "cache" in forward_args else "past_key_values"
        keeps_logits = "logits_to_keep" in forward_args or "kwargs" in forward_args
        self._runner = ModelRunner(model, cache_kw, keeps_logits)
        self._decoders: OrderedDict = OrderedDict()
        self._free_bytes = lambda: memory.available_bytes(self.device)
        self.kv_bytes_per_position = 0  # measured on the model (`selfcheck`)
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        # warm-up (graph capture) time, decoders built, whether graphs run, and items admitted into a block
        # that was still running (refills) or into an empty one.
        self.stats = {"warmup_seconds": 0.0, "decoders": 0, "graphs": self.graphs, "refills": 0, "admissions": 0}
        if self_check:
            check_model(self)
        else:
            probe(self)

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
    ) -> list[GenerationResult]:
        """Generate for every prompt; returns results item-major (item 0's samples first), in input order.

        Args:
            prompts: prompt strings (a non-string becomes a per-row error result).
            seeds: one seed per prompt; default `derive_seed(0, index)`.
            params: sampling parameters: one for every prompt (default `SamplingParams()`), or one per prompt.
                A row's text depends on its own params only, whatever its neighbours use.
            batch_size: prompts tokenized together. It changes no text, and no slot waits for it: every item of the
                call is queued at once and slots are refilled across the whole call.
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
        work: list[WorkItem] = []
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
                    work.append(WorkItem(r, ids, bucket, p, matcher, grammar))
        if work:
            with no_grad():
                self._run(work)
                prompt_logprobs(self, [w for w in work if w.params.prompt_logprobs])
        return results

    def _run(self, work: list[WorkItem]) -> None:
        """Decode `work`: one queue per sampler shape, in order of first appearance."""
        from .sampler import SamplerShape

        queues: dict[object, deque[WorkItem]] = {}
        for w in work:
            queues.setdefault(SamplerShape.of(w.params, self.vocab_size), deque()).append(w)
        for shape, queue in queues.items():
            queue = self._fit(queue)
            if queue:
                longest = max(reach(w) for w in queue)
                dec = self._decoder(shape, longest, sorted({w.bucket for w in queue}))
                drain(self, dec, queue)

    def _budget(self) -> int:
        """Bytes a new decoder may take: the free memory and what the held decoders would give back."""
        return self._free_bytes() + sum(d.nbytes for d in self._decoders.values())

    def _fit(self, queue: deque[WorkItem]) -> deque[WorkItem]:
        """The items whose cache fits in memory at `slots` rows; the others become error rows, with the sizes.

        Raises:
            UserError: the memory cannot even hold a cache for the shortest row (no slot count would run).
        """
        per = self.kv_bytes_per_position
        length = cache_length(max(reach(w) for w in queue), 0)
        budget = self._budget()
        if memory.cache_bytes(self.slots, length, per) <= memory.USABLE * budget:
            return queue
        fits = memory.fitting_length(self.slots, per, budget)
        kept: deque[WorkItem] = deque()
        for w in queue:
            need = cache_length(reach(w), 0)
            if need <= fits:
                kept.append(w)
                continue
            w.result.error = (
                f"prompt ({len(w.prompt_ids)} tokens) and max_new_tokens ({w.params.max_new_tokens}) need a KV cache "
                f"of {memory.describe(self.slots, need, per)}, but {memory.gb(budget)} is free: lower "
                f"max_new_tokens or use fewer slots (--slots {max(2, memory.fitting_slots(need, per, budget))} fits)"
            )
            w.result.finish_reason, w.result.attempts = "error", 0
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

    # ---------------------------------------------------------------- self-check
