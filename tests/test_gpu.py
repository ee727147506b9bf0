"""CUDA: the engine's graph-captured path gives byte-identical rows on a GPU. Skipped without CUDA.

Slots are part of the numerics, so every comparison is at equal slots.
"""

from __future__ import annotations

import random

import pytest

from aitextgen_batch.generation import Engine, SamplingParams, derive_seed
from tests.conftest import WORDS


def _prompts(n: int):
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]
    return prompts, [derive_seed(1, i) for i in range(n)]


def _texts(results):
    return [(r.text.encode(), r.finish_reason, r.attempts) for r in results]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_graphs_are_invariant(tiny_model_dir, dtype):
    eng = Engine.from_pretrained(str(tiny_model_dir), device="cuda", dtype=dtype, slots=16)
    assert eng.graphs and eng.check_every > 1
    prompts, seeds = _prompts(150)
    # Early finishes (stop strings, eos) make refill happen; every sampling stage runs.
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=40, top_p=0.95, stop=["ox"])
    ref = _texts(eng.generate(prompts, seeds, params, 150))
    assert eng.stats["graphs"] is True and eng.stats["warmup_seconds"] > 0 and eng.stats["refills"] > 0
    assert len({t for t, _, _ in ref}) > 100
    assert _texts(eng.generate(prompts, seeds, params, 1)) == ref
    assert _texts(eng.generate(prompts[::-1], seeds[::-1], params, 7)) == ref[::-1]
    subset = list(range(0, 150, 11))
    assert _texts(eng.generate([prompts[i] for i in subset], [seeds[i] for i in subset], params, 5)) == [
        ref[i] for i in subset
    ]
    eng.refill = False
    assert _texts(eng.generate(prompts, seeds, params, 150)) == ref
    # Graph replays run the same kernels as eager steps: the eager path gives the same bytes.
    eager = Engine(eng.model, eng.tokenizer, slots=16, graphs=False)
    assert _texts(eager.generate(prompts, seeds, params, 150)) == ref


@pytest.mark.gpu
def test_cuda_draws_equal_the_documented_uniform():
    import torch

    from aitextgen_batch.generation.seeds import to_signed64, uniform, uniform_tensor

    rng = random.Random(0)
    keys = [rng.getrandbits(64) for _ in range(2000)]
    steps = [rng.randrange(100_000) for _ in keys]
    got = uniform_tensor(
        torch.tensor([to_signed64(k) for k in keys], device="cuda"), torch.tensor(steps, device="cuda")
    ).tolist()
    assert got == [uniform(k, s) for k, s in zip(keys, steps, strict=True)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_invariance_default_slots(tiny_model_dir, dtype):
    eng = Engine.from_pretrained(str(tiny_model_dir), device="cuda", dtype=dtype)
    assert eng.device.type == "cuda" and eng.slots == 64
    prompts, seeds = _prompts(150)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=0)
    ref = [r.text for r in eng.generate(prompts, seeds, params, 150)]
    assert [r.text for r in eng.generate(prompts, seeds, params, 1)] == ref
    assert [r.text for r in eng.generate(prompts[::-1], seeds[::-1], params, 7)] == ref[::-1]


@pytest.mark.gpu
def test_cuda_job_uses_gpu_actors(tiny_model_dir, tmp_path, ray_local):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aitextgen_batch.batch.api import generate_dataset

    pq.write_table(pa.table({"id": list(range(20)), "prompt": ["the fox"] * 20}), tmp_path / "p.parquet")
    s = generate_dataset(
        input=str(tmp_path / "p.parquet"),
        output=str(tmp_path / "out"),
        model=str(tiny_model_dir),
        gpus_per_actor=1,
        max_new_tokens=4,
        quiet=True,
    )
    assert s["status"] == "complete"
    job = pd.read_json(tmp_path / "out" / "_job.json", typ="series")
    assert job["identity"]["engine"]["device"] == "cuda"
