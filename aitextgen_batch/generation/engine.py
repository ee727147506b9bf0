"""The batch-invariant generation engine: every item's text depends on its prompt, seed and params alone.

Why the text cannot depend on the rest of the batch (each point was measured to matter on CPU fp32):
- Shapes: the model always runs on blocks of exactly `slots` rows (unused rows are dummies), because
  a matmul's row results change with its row count (1, 2-3, 4-6 and >= 7 rows took different kernels).
  `batch_size` only decides how many items are scheduled together, never a kernel's shape.
- Padding: a prompt is left-padded to a bucket length that depends on its own length, so its attention
  reductions run over the same number of keys wherever it is placed; rows in a block share a bucket.
- Attention: eager, which is exact row-wise (sdpa was not).
- Randomness: a counter-based draw per (seed, attempt, step) (`seeds.uniform`); the token choice is
  row-wise numpy (`sampling.choose_tokens`).
So a block's forward passes compute the same bits for a row whatever its neighbours are, and the
result is byte-identical alone, in any batch size, order or subset.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .params import SamplingParams
from .sampling import choose_tokens
from .seeds import derive_seed, sample_seed, stream_key, uniform

# Re-draws of an empty output (nonempty_output) before giving up and returning the empty text.
MAX_ATTEMPTS = 8
DEFAULT_SLOTS = {"cpu": 32, "cuda": 64}


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
    token_ids: list[int] = field(default_factory=list)
    attempts: int = 1


@dataclass
class _Work:
    result: GenerationResult
    prompt_ids: list[int]
    attempt: int = 0


def bucket_length(n: int, limit: int) -> int:
    """Padded prompt length for an n-token prompt: 8, 16, 24, 32, 48, 64, 96, 128, ... capped at `limit`."""
    b = 8
    while b < n:
        b = b + 8 if b < 32 else b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3
    return max(n, min(b, limit))


class Engine:
    """Batched, seeded, batch-invariant decoding for any Hugging Face causal LM."""

    def __init__(self, model, tokenizer, *, slots: int | None = None, source: str | None = None, folder=None):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.slots = int(slots or DEFAULT_SLOTS.get(self.device.type, 32))
        if self.slots < 2:
            raise UserError(f"slots must be >= 2 (a 1-row matmul takes another kernel path), got {self.slots}")
        self.source = source
        self._folder = folder
        self._fingerprint: str | None = None
        cfg = model.config
        self.context_length = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        )
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_token_id
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._torch = torch
        forward_args = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed `past_key_values` to `cache`; remote-code models may still use the old name.
        self._cache_kw = "cache" if "cache" in forward_args else "past_key_values"
        self._keeps_logits = "logits_to_keep" in forward_args or "kwargs" in forward_args

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        device: str | None = None,
        dtype=None,
        *,
        slots: int | None = None,
        threads: int | None = None,
        tokenizer=None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
    ) -> Engine:
        """Load `source` (any `load_model` source) with eager attention, ready to generate.

        Args:
            source: model folder, cached hub id, or preset (with `tokenizer`).
            device: default CUDA when available, else CPU.
            dtype: default fp32 on CPU, bf16/fp16 on GPU.
            slots: rows per forward pass (fixed shape). Part of the numerics: keep it to replay rows.
            threads: torch CPU threads (results do not depend on it; speed does).
        """
        import torch

        from ..models.loading import load_model, resolve_source

        if threads:
            torch.set_num_threads(int(threads))
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
        return cls(model, tok, slots=slots, source=resolved.source, folder=resolved.folder)

    @property
    def fingerprint(self) -> str:
        """The model fingerprint (weights, config, tokenizer), computed once."""
        if self._fingerprint is None:
            from ..models.fingerprint import model_fingerprint

            self._fingerprint = model_fingerprint(self.model, self.tokenizer, self._folder)
        return self._fingerprint

    def describe(self) -> dict:
        """What determines this engine's numerics, for manifests and replay."""
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "device": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "slots": self.slots,
        }

    # ---------------------------------------------------------------- encoding

    def _encode(self, prompts: Sequence, params: SamplingParams) -> list[tuple[list[int] | None, str | None]]:
        texts, bad = [], {}
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                bad[i] = f"prompt must be a string, got {type(p).__name__}"
                texts.append("")
            else:
                texts.append(params.prefix + p)
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        limit = self.context_length - params.max_new_tokens
        out = []
        for i, ids in enumerate(enc):
            if i in bad:
                out.append((None, bad[i]))
                continue
            ids = list(ids)
            if params.prepend_bos or not ids:
                ids = [self.bos_id] + ids
            if limit < 1:
                out.append(
                    (
                        None,
                        f"max_new_tokens={params.max_new_tokens} leaves no room for a prompt in the "
                        f"model's context of {self.context_length} tokens; lower --max-new-tokens",
                    )
                )
            elif len(ids) > limit:
                if params.truncate == "left":
                    ids = ids[-limit:]
                else:
                    out.append(
                        (
                            None,
                            f"prompt has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} "
                            f"it exceeds the model's context of {self.context_length}: shorten it, lower "
                            "--max-new-tokens, or pass --truncate left",
                        )
                    )
                    continue
                out.append((ids, None))
            else:
                out.append((ids, None))
        return out

    # ---------------------------------------------------------------- generation

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        params: SamplingParams | None = None,
        batch_size: int = 64,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt; returns results item-major (item 0's samples first), in input order.

        Args:
            prompts: prompt strings (a non-string becomes a per-row error result).
            seeds: one seed per prompt; default `derive_seed(0, index)`.
            params: sampling parameters (default `SamplingParams()`).
            batch_size: items scheduled together (grouped by prompt length). It never changes any text.
            on_progress: called with (results finished, tokens generated) after each block.
        """
        params = params or SamplingParams()
        if batch_size < 1:
            raise UserError(f"batch_size (--batch-size) must be >= 1, got {batch_size}")
        if seeds is None:
            seeds = [derive_seed(0, i) for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise UserError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
        encoded = self._encode(prompts, params)
        results: list[GenerationResult] = []
        work: list[_Work] = []
        for i, ((ids, err), seed) in enumerate(zip(encoded, seeds, strict=True)):
            for k in range(params.num_return_sequences):
                r = GenerationResult(i, k, sample_seed(int(seed), k))
                results.append(r)
                if err is not None:
                    r.error, r.finish_reason, r.attempts = err, "error", 0
                else:
                    r.num_prompt_tokens = len(ids)
                    work.append(_Work(r, ids))
        done_count = len(results) - len(work)
        tokens = 0
        for start in range(0, len(work), batch_size):
            pending = work[start : start + batch_size]
            while pending:
                redo: list[_Work] = []
                for block, bucket in self._blocks(pending, params):
                    tokens += self._run_block(block, bucket, params)
                    for w in block:
                        if (
                            params.nonempty_output
                            and not w.result.text.strip()
                            and w.attempt + 1 < MAX_ATTEMPTS
                            and w.result.finish_reason != "error"
                        ):
                            w.attempt += 1
                            redo.append(w)
                        else:
                            done_count += 1
                    if on_progress:
                        on_progress(done_count, tokens)
                pending = redo
        return results

    def _blocks(self, work: list[_Work], params: SamplingParams):
        """Group by bucket (order of first appearance), then cut into blocks of at most `slots` rows."""
        limit = self.context_length - params.max_new_tokens
        groups: dict[int, list[_Work]] = defaultdict(list)
        for w in work:
            groups[bucket_length(len(w.prompt_ids), limit)].append(w)
        for bucket, ws in groups.items():
            for s in range(0, len(ws), self.slots):
                yield ws[s : s + self.slots], bucket

    def _forward(self, ids, mask, pos, cache):
        kwargs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": pos,
            self._cache_kw: cache,
            "use_cache": True,
        }
        if self._keeps_logits:  # compute the vocabulary projection for the last position only
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits[:, -1, :]

    def _run_block(self, block: list[_Work], bucket: int, params: SamplingParams) -> int:
        """Decode one fixed-shape block of `slots` rows; fills each row's result. Returns tokens generated."""
        torch = self._torch
        from transformers import StaticCache

        n, rows = len(block), self.slots
        ids = np.full((rows, bucket), self.pad_id, dtype=np.int64)
        mask = np.zeros((rows, bucket), dtype=np.int64)
        pos = np.zeros((rows, bucket), dtype=np.int64)
        for j in range(rows):
            p = block[j].prompt_ids if j < n else [self.eos_id]  # dummy rows: one eos token
            ids[j, bucket - len(p) :] = p
            mask[j, bucket - len(p) :] = 1
            pos[j, bucket - len(p) :] = np.arange(len(p))
        seen = None
        if params.repetition_penalty != 1.0:
            seen = np.zeros((n, self.vocab_size), dtype=bool)
            for j, w in enumerate(block):
                seen[j, [t for t in w.prompt_ids if t < self.vocab_size]] = True
        keys = [stream_key(w.result.seed, w.attempt) for w in block]
        gen: list[list[int]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        next_pos = pos[:, -1] + 1
        dev = self.device
        t_ids, t_mask = torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev)
        # A preallocated cache: no per-step concatenation, and its length depends on the row's bucket only.
        cache = StaticCache(config=self.model.config, max_cache_len=bucket + params.max_new_tokens)
        generated = 0
        with torch.inference_mode():
            logits = self._forward(t_ids, t_mask, torch.from_numpy(pos).to(dev), cache)
            for step in range(params.max_new_tokens):
                active = [j for j in range(n) if finish[j] is None]
                lg = logits[:n].float().cpu().numpy()[active]
                u = np.array([uniform(keys[j], step) for j in active])
                suppress = [self.eos_id] if step < params.min_new_tokens and self.eos_id is not None else None
                chosen = choose_tokens(lg, params, u, None if seen is None else seen[active], suppress)
                feed = np.full((rows, 1), self.eos_id, dtype=np.int64)
                for j, tok in zip(active, chosen.tolist(), strict=True):
                    feed[j, 0] = tok
                    generated += 1
                    if tok == self.eos_id:
                        finish[j] = "eos"
                        continue
                    gen[j].append(tok)
                    if seen is not None:
                        seen[j, tok] = True
                    if params.stop and self._stop_index(gen[j], params) is not None:
                        finish[j] = "stop"
                    elif len(gen[j]) >= params.max_new_tokens:
                        finish[j] = "length"
                if all(f is not None for f in finish):
                    break
                t_mask = torch.cat([t_mask, torch.ones((rows, 1), dtype=t_mask.dtype, device=dev)], dim=1)
                step_pos = torch.from_numpy(next_pos[:, None] + step).to(dev)
                logits = self._forward(torch.from_numpy(feed).to(dev), t_mask, step_pos, cache)
        for j, w in enumerate(block):
            self._finish(w, gen[j], finish[j] or "length", params)
        return generated

    def _decode(self, token_ids: list[int], params: SamplingParams) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)

    def _stop_index(self, token_ids: list[int], params: SamplingParams) -> int | None:
        text = self._decode(token_ids, params)
        hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
        return min(hits) if hits else None

    def _finish(self, w: _Work, token_ids: list[int], reason: str, params: SamplingParams) -> None:
        r = w.result
        text = self._decode(token_ids, params)
        if reason == "stop":
            text = text[: self._stop_index(token_ids, params)]
        if params.lstrip:
            text = text.lstrip()
        r.text, r.token_ids, r.finish_reason, r.error = text, token_ids, reason, None
        r.num_generated_tokens = len(token_ids) + (reason == "eos")
        r.attempts = w.attempt + 1
