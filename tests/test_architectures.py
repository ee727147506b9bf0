"""Every architecture the engine serves, at tiny random configs: exact greedy decoding and batch invariance.

For each model type, greedy output must equal a plain full-forward argmax loop (no cache, no padding),
and sampled rows must be byte-identical solo, batched, shuffled and with slot refill on or off. An
architecture the engine cannot serve exactly is refused with a clear error (the self-check), never run.
"""

from __future__ import annotations

import random

import pytest
import torch

from aitextgen_batch.errors import UserError
from aitextgen_batch.generation import Engine, SamplingParams, derive_seed
from tests.conftest import WORDS, argmax_reference

LLAMA_LIKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# Sliding windows are tiny (8) so that prompts and generations really cross them.
ARCHITECTURES = {
    "gpt2": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": dict(LLAMA_LIKE, head_dim=16),
    "mistral": dict(LLAMA_LIKE, sliding_window=8),
    "gemma": dict(LLAMA_LIKE, head_dim=16),
    "gemma2": dict(LLAMA_LIKE, head_dim=16, sliding_window=8),
    "gemma3_text": dict(LLAMA_LIKE, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(LLAMA_LIKE, sliding_window=8),
    "gpt_neox": dict(LLAMA_LIKE, num_key_value_heads=None),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8),
    "starcoder2": dict(LLAMA_LIKE, sliding_window=8),
    "olmo2": LLAMA_LIKE,
    "mixtral": dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
}


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from aitextgen_batch.models.loading import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def build(model_type: str, tok, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in {**ARCHITECTURES[model_type], **overrides}.items() if v is not None}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **fields,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def texts(results) -> list[bytes]:
    return [r.text.encode() for r in results]


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_architecture_is_exact_and_invariant(model_type, tok):
    model = build(model_type, tok)
    engine = Engine(model, tok, slots=6, prefill_rows=2)
    rng = random.Random(1)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(10)]
    seeds = [derive_seed(3, i) for i in range(len(prompts))]

    greedy = engine.generate(prompts, seeds, SamplingParams(max_new_tokens=12, temperature=0, nonempty_output=False))
    for prompt, r in zip(prompts, greedy, strict=True):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert r.token_ids == argmax_reference(model, ids, 12, engine.eos_ids, keep_eos=True), prompt

    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, stop=["fox"])
    ref = texts(engine.generate(prompts, seeds, params, batch_size=10))
    assert len(set(ref)) > 5  # really sampled
    order = list(range(len(prompts)))
    rng.shuffle(order)
    shuffled = engine.generate([prompts[i] for i in order], [seeds[i] for i in order], params, batch_size=4)
    assert texts(shuffled) == [ref[i] for i in order]
    engine.refill = False
    assert texts(engine.generate(prompts, seeds, params, batch_size=10)) == ref
    for i in (0, 7):
        assert texts(engine.generate([prompts[i]], [seeds[i]], params, batch_size=1)) == [ref[i]]


def test_alibi_is_refused(tok):
    with pytest.raises(UserError, match="ALiBi"):
        Engine(build("falcon", tok, alibi=True), tok, slots=4)


def test_self_check_refuses_a_model_the_engine_would_get_wrong(tok, monkeypatch):
    """Pretend the engine forgot Mistral's sliding window: the self-check must catch the wrong logits."""
    from aitextgen_batch.generation import kvcache

    real_init = kvcache.MaskKinds.__init__

    def no_windows(self, config):
        real_init(self, config)
        self.by_kind = dict.fromkeys(self.by_kind)

    monkeypatch.setattr(kvcache.MaskKinds, "__init__", no_windows)
    with pytest.raises(UserError, match="cannot be served exactly.*it would produce wrong text"):
        Engine(build("mistral", tok), tok, slots=4)
    Engine(build("llama", tok), tok, slots=4)  # no window to forget: still accepted


def test_unknown_attention_kind_is_refused(tok):
    model = build("gemma3_text", tok)
    model.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(UserError, match="chunked_attention.*cannot serve"):
        Engine(model, tok, slots=4)
