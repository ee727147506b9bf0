"""What the engine checks of a model at load: that it can serve it exactly, its KV-cache size, its eos ids."""

from __future__ import annotations

from ..errors import UserError
from . import attention
from .params import SamplingParams
from .work import bucket_length, cache_length


def probe(engine) -> None:
    """Measure the KV cache's bytes per (slot, position) with a one-token prefill (what `self_check` does too)."""
    from .sampler import SamplerShape
    from .slots import Admission, Decoder, no_grad

    shape = SamplerShape(engine.vocab_size, engine.vocab_size, False, False)
    dec = Decoder(
        engine._runner,
        slots=2,
        prefill_rows=2,
        length=64,
        shape=shape,
        eos_ids=engine.eos_ids,
        pad_id=engine.pad_id,
        device=engine.device,
        graphs=False,
    )
    with no_grad():
        dec.admit([(0, Admission([engine.bos_id], 8, 0, SamplingParams(max_new_tokens=1)))])
    engine.kv_bytes_per_position = dec.cache.nbytes // ((dec.slots + 1) * dec.length)


def self_check(engine, steps: int = 4) -> None:
    """Refuse a model whose cached, padded decode differs from its own full forward pass.

    A short greedy decode through the real prefill/decode path (left padding, per-row cache writes,
    ready-made masks, sliding windows) is compared, logit by logit, with one plain forward pass over
    the same tokens. An architecture whose layers do not go through the cache or masks the way the
    engine assumes would give wrong text; it is refused instead.
    """
    import torch

    from .sampler import SamplerShape
    from .slots import Admission, Decoder, no_grad

    windows = [w for w in engine._runner.kinds.by_kind.values() if w]
    n = max(24, 2 * max(windows) + 8) if windows else 24
    n = max(2, min(n, 512, engine.context_length - steps - 1))
    ids = [(i * 7919 + 13) % engine.vocab_size for i in range(n)]
    bucket = bucket_length(n, n)
    params = SamplingParams(max_new_tokens=steps, min_new_tokens=steps, temperature=0, nonempty_output=False)
    with no_grad():
        try:
            dec = Decoder(
                engine._runner,
                slots=2,
                prefill_rows=2,
                length=cache_length(bucket, steps),
                shape=SamplerShape(engine.vocab_size, engine.vocab_size, False, False),
                eos_ids=engine.eos_ids,
                pad_id=engine.pad_id,
                device=engine.device,
                graphs=False,
            )
            dec.admit([(0, Admission(ids, bucket, 0, params))])
            engine.kv_bytes_per_position = dec.cache.nbytes // ((dec.slots + 1) * dec.length)
            got = [dec.logits[0].clone()]
            for _ in range(steps - 1):
                dec.steps(1)
                got.append(dec.logits[0].clone())
            fed = ids + dec.tokens[0, : steps - 1].tolist()
            engine.model.set_attn_implementation("eager")  # the reference: the model's own attention
            try:
                want = engine.model(torch.tensor([fed], device=engine.device)).logits[0, n - 1 :].float()
            finally:
                engine.model.set_attn_implementation(attention.ATTENTION)
        except (RuntimeError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise UserError(
                f"model type {engine.model.config.model_type!r} cannot run in the batch-invariant engine: "
                f"its forward pass failed with a per-row cache and explicit masks ({type(exc).__name__}: {exc})"
            ) from exc
    got = torch.stack(got)
    err = float(((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-6)).max())
    tolerance = 1e-4 if engine.dtype == torch.float32 else 5e-2
    if not err <= tolerance:
        raise UserError(
            f"model type {engine.model.config.model_type!r} cannot be served exactly by the batch-invariant "
            f"engine: its cached, padded decode differs from a full forward pass (relative error {err:.2g} > "
            f"{tolerance:g}); it would produce wrong text, so it is refused"
        )


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


def refuse_unservable(config) -> None:
    """Architectures whose attention bias is built from a 2D padding mask (ALiBi) cannot take our masks."""
    if getattr(config, "alibi", False) or getattr(config, "use_alibi", False) or config.model_type in ("bloom", "mpt"):
        raise UserError(
            f"model type {config.model_type!r} uses ALiBi position biases, which the batch-invariant engine "
            "cannot serve with its per-row cache"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"model type {config.model_type!r} is an encoder-decoder; the engine serves causal LMs")
