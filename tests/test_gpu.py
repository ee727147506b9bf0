"""CUDA: the engine's fixed-shape mode gives byte-identical rows on a GPU too (bf16). Skipped without CUDA."""

from __future__ import annotations

import pytest

from aitextgen_batch.generation import Engine, SamplingParams, derive_seed
from tests.conftest import WORDS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_invariance(tiny_model_dir, dtype):
    eng = Engine.from_pretrained(str(tiny_model_dir), device="cuda", dtype=dtype)
    assert eng.device.type == "cuda" and eng.slots == 64
    prompts = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(1 + i % 17)) for i in range(150)]
    seeds = [derive_seed(1, i) for i in range(150)]
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
