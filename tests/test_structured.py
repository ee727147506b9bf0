"""Structured output: JSON Schema, regex, choice and grammar constraints (llguidance), on the default model and in
jobs: valid rows, exact invariance, replay, refusals and error rows."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from aitextgen_batch.batch.api import generate_dataset
from aitextgen_batch.batch.verify import replay_row, verify_output
from aitextgen_batch.errors import UserError
from aitextgen_batch.generation import Engine, SamplingParams, derive_seed
from aitextgen_batch.models.default import ensure_default_model

SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "answer": {"type": "string"},
        "difficulty": {"enum": ["easy", "medium", "hard"]},
    },
    "required": ["question", "answer", "difficulty"],
    "additionalProperties": False,
}
TOPICS = ["the moon", "bees", "rain", "volcanoes", "the ocean", "trees", "music", "bread"]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(str(ensure_default_model()), device="cpu", slots=16)


def chat(engine, text: str) -> str:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def schema_prompts(engine) -> list[str]:
    return [
        chat(engine, f"Write one quiz question about {t} with its answer and difficulty, as a JSON object.")
        for t in TOPICS
    ]


def as_bytes(results) -> list[tuple]:
    return [(r.text, r.token_ids, r.token_logprobs, r.finish_reason, r.valid) for r in results]


def test_every_row_that_ends_at_eos_is_valid(engine):
    """A JSON Schema, a regex and a choice on the real model: every row that ends at eos satisfies its constraint
    (checked on the text: JSON parsed and validated with `jsonschema`, the regex matched, the choice found)."""
    schema = SamplingParams(max_new_tokens=96, temperature=0.7, json_schema=json.dumps(SCHEMA))
    res = engine.generate(schema_prompts(engine), [derive_seed(1, i) for i in range(8)], schema, 8)
    ended = [r for r in res if r.finish_reason == "eos"]
    assert len(ended) >= 4 and all(r.valid for r in ended)
    for r in ended:
        obj = json.loads(r.text)
        assert set(obj) == {"question", "answer", "difficulty"} and obj["difficulty"] in ("easy", "medium", "hard")
    numbers = SamplingParams(max_new_tokens=8, temperature=0.7, regex=r"[0-9]{1,4}")
    questions = ["What is 12 times 12?", "How many legs does a spider have?", "What is 7 plus 5?"]
    res = engine.generate([chat(engine, q) for q in questions], [1, 2, 3], numbers, 3)
    assert all(r.finish_reason == "eos" and r.valid and r.text.isdigit() for r in res)
    yes_no = SamplingParams(max_new_tokens=8, temperature=0.7, choice=["yes", "no"])
    res = engine.generate([chat(engine, "Is the sky blue? Answer yes or no.")] * 4, [4, 5, 6, 7], yes_no, 4)
    assert all(r.finish_reason == "eos" and r.valid and r.text in ("yes", "no") for r in res)
    short = SamplingParams(max_new_tokens=6, json_schema=json.dumps(SCHEMA))
    cut = engine.generate(schema_prompts(engine)[:2], [1, 2], short, 2)
    assert all(r.finish_reason == "length" and r.valid is False for r in cut)
    free = engine.generate(schema_prompts(engine)[:1], [1], SamplingParams(max_new_tokens=4), 1)
    assert free[0].valid is None


def test_greedy_constrained_output_equals_a_reference_loop(engine):
    """Greedy decoding under a JSON Schema equals a plain loop that masks the model's own full-forward logits with the
    same library, one token at a time."""
    import llguidance.torch
    import numpy as np

    from aitextgen_batch.generation.constraints import Grammars

    params = SamplingParams(max_new_tokens=24, temperature=0, json_schema=json.dumps(SCHEMA), lstrip=False)
    prompts = schema_prompts(engine)[:2]
    got = engine.generate(prompts, [0, 1], params, 2)
    grammars = Grammars(engine.tokenizer, engine.vocab_size, engine.eos_ids)
    grammar, error = grammars.compile("json_schema", params.json_schema)
    assert error is None
    model = engine.model
    model.set_attn_implementation("eager")
    try:
        for prompt, r in zip(prompts, got, strict=True):
            ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            matcher, out = grammars.matcher(grammar), []
            mask = llguidance.torch.allocate_token_bitmask(1, engine.vocab_size)
            for _ in range(24):
                with torch.no_grad():
                    logits = model(torch.tensor([ids + out])).logits[0, -1]
                llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
                bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[: engine.vocab_size]
                token = int(logits.masked_fill(~torch.from_numpy(bits.astype(bool)), float("-inf")).argmax())
                out.append(token)
                if token in engine.eos_ids:
                    break
                matcher.consume_token(token)
            assert r.token_ids == out
    finally:
        from aitextgen_batch.generation.attention import ATTENTION

        model.set_attn_implementation(ATTENTION)


def test_constrained_and_mixed_rows_are_the_same_in_any_batch(engine):
    """Rows with a schema, a regex, a choice, and none, mixed: byte-identical (valid flags included) in any batch size,
    order, refill on or off, and alone."""
    prompts = schema_prompts(engine)[:4] + [chat(engine, "What is 9 times 9?"), chat(engine, "Is ice cold?")] * 2
    params = [SamplingParams(max_new_tokens=32, temperature=0.8, json_schema=json.dumps(SCHEMA))] * 4 + [
        SamplingParams(max_new_tokens=8, temperature=0.8, regex=r"[0-9]{1,3}"),
        SamplingParams(max_new_tokens=8, temperature=0.8, choice=["yes", "no"]),
        SamplingParams(max_new_tokens=16, temperature=0.8),
        SamplingParams(max_new_tokens=16, temperature=0.8, top_k=0),
    ]
    seeds = [derive_seed(9, i) for i in range(len(prompts))]
    want = as_bytes(engine.generate(prompts, seeds, params, batch_size=len(prompts)))
    assert [w[4] for w in want][4:6] == [True, True] and [w[4] for w in want][6:] == [None, None]
    order = [5, 0, 7, 2, 6, 1, 4, 3]
    shuffled = engine.generate([prompts[i] for i in order], [seeds[i] for i in order], [params[i] for i in order], 3)
    assert [as_bytes([shuffled[order.index(i)]])[0] for i in range(len(prompts))] == want
    engine.refill = False
    try:
        assert as_bytes(engine.generate(prompts, seeds, params, batch_size=len(prompts))) == want
    finally:
        engine.refill = True
    for i in (1, 5):
        assert as_bytes(engine.generate([prompts[i]], [seeds[i]], params[i], 1)) == [want[i]]


def test_constraints_in_jobs(ray_local, tiny_model_dir, tmp_path):
    """Job-wide and per-row constraints on Ray and in-process: the same bytes and `valid` column; a row replays alone
    and verify passes; a bad per-row constraint is that row's error naming the field; a schema or regex that does not
    compile is refused before any work."""
    rows = [
        {"id": "a", "prompt": "the quick fox", "params": None},
        {"id": "b", "prompt": "a lazy dog", "params": json.dumps({"regex": "[a-z]{2,6}"})},
        {"id": "c", "prompt": "seven wizards", "params": json.dumps({"choice": ["red", "green", "blue"]})},
        {
            "id": "d",
            "prompt": "music plays",
            "params": json.dumps({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}),
        },
        {"id": "e", "prompt": "old river", "params": json.dumps({"regex": "[a-z+"})},
        {"id": "f", "prompt": "bold zebras", "params": json.dumps({"json_schema": "not a schema"})},
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    common = dict(
        input=str(tmp_path / "p.parquet"),
        model=str(tiny_model_dir),
        params_column="params",
        json_schema=json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}),
        max_new_tokens=24,
        temperature=0.9,
        shard_rows=2,
        quiet=True,
    )
    assert generate_dataset(output=str(tmp_path / "ray"), num_actors=2, **common).status == "complete"
    assert generate_dataset(output=str(tmp_path / "here"), in_process=True, **common).status == "complete"
    a, b = (pd.read_parquet(tmp_path / p).set_index("id").sort_index() for p in ("ray", "here"))
    cols = ["text", "finish_reason", "valid", "error"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert a.finish_reason["e"] == "error" and "regex does not compile" in a.error["e"]
    assert a.finish_reason["f"] == "error" and "json_schema" in a.error["f"]
    for i in "abcd":
        assert a.valid[i] == (a.finish_reason[i] == "eos")  # a row cut at max_new_tokens is never valid
    if a.finish_reason["c"] == "eos":
        assert a.text["c"] in ("red", "green", "blue")
    _, result, match = replay_row(tmp_path / "ray", "c")
    assert match and result.valid == a.valid["c"]
    assert verify_output(tmp_path / "here", sample=4)["mismatches"] == 0
    for bad, flag in ((dict(regex="(unclosed"), "--regex"), (dict(json_schema='{"type": "nope"}'), "--json-schema")):
        with pytest.raises(UserError, match=flag):
            generate_dataset(**{**common, "json_schema": None, **bad}, output=str(tmp_path / "bad"), in_process=True)
        assert not (tmp_path / "bad").exists()
