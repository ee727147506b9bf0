"""The Ray Data stage (`aitextgen_batch.ray_data`): the same rows give the same bytes as `generate`, whatever Ray
Data's batching, and an actor killed mid-pipeline loses no row."""

from __future__ import annotations

import json
import os
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aitextgen_batch.batch.api import generate_dataset
from aitextgen_batch.errors import UserError
from aitextgen_batch.ray_data import ProcessorConfig, build_processor
from tests.conftest import WORDS

SAMPLING = {"max_new_tokens": 6, "temperature": 1.0, "top_k": 0}
ENGINE = {"slots": 8, "threads": 1}
COMPARED = [
    "id", "sample_index", "prompt", "seed", "text", "num_prompt_tokens", "num_generated_tokens", "finish_reason",
    "error", "valid", "params", "cumulative_logprob", "token_ids", "token_logprobs", "topic",
]  # fmt: skip


def _rows(n: int = 200) -> pa.Table:
    """n rows: ids, prompts, a seed column with nulls (derived seeds), per-row params (short rows, two samples, two
    invalid rows), an empty prompt (an error row) and a kept column."""
    prompts, seeds, params = [], [], []
    for i in range(n):
        prompts.append("" if i == 17 else " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(1 + i % 9)))
        seeds.append(None if i % 3 else 1000 + i)
        p = {"max_new_tokens": 3} if i % 4 == 0 else {"num_return_sequences": 2} if i % 11 == 0 else None
        params.append(json.dumps({"temperature": -1.0}) if i in (40, 41) else p and json.dumps(p))
    return pa.table(
        {
            "id": list(range(n)),
            "prompt": prompts,
            "seed": pa.array(seeds, pa.int64()),
            "params": params,
            "topic": [f"t{i % 7}" for i in range(n)],
        }
    )


def _stage_pids() -> list[int]:
    """Processes of the stage's actors running a batch now (Ray titles them `ray::MapWorker(...GenerateStage...)`,
    with `.submit` while a batch runs)."""
    import psutil

    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any("GenerateStage" in c and c.rstrip().endswith(".submit") for c in (p.info["cmdline"] or []))
    ]


def _sorted(table: pa.Table) -> dict:
    return table.select(COMPARED).sort_by([("id", "ascending"), ("sample_index", "ascending")]).to_pydict()


def test_rows_through_the_ray_data_stage_equal_generate_byte_for_byte_after_an_actor_is_killed(
    tiny_model_dir, tmp_path, ray_local
):
    import ray.data

    table = _rows()
    wanted = table.filter(pa.compute.not_equal(pa.compute.bit_wise_and(table["id"], 15), 15))  # the pipeline's filter
    pq.write_table(wanted, tmp_path / "in.parquet")
    ref = generate_dataset(
        input=str(tmp_path / "in.parquet"), output=str(tmp_path / "ref"), model=str(tiny_model_dir), in_process=True,
        seed_column="seed", params_column="params", keep_columns=["topic"], logprobs=True, return_tokens=True,
        quiet=True, **SAMPLING, **ENGINE,
    )  # fmt: skip
    assert ref["status"] == "complete" and ref["error_rows"] == 3

    config = ProcessorConfig(
        model=str(tiny_model_dir), sampling_params=SAMPLING, seed_column="seed", params_column="params",
        logprobs=True, return_tokens=True, concurrency=2, num_cpus=0.5, batch_size=16, **ENGINE,
    )  # fmt: skip
    blocks = [table.slice(i, 25) for i in range(0, table.num_rows, 25)]
    ds = build_processor(config)(ray.data.from_arrow(blocks).filter(lambda row: row["id"] % 16 != 15))
    got, killed = [], None
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        got.append(batch)
        if killed is None:  # once the first rows are out, kill an actor in the middle of a batch
            pids = []
            deadline = time.time() + 60
            while not pids and time.time() < deadline:
                pids = _stage_pids()
                time.sleep(0.01)
            if pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
    assert killed, "no stage actor was found running a batch"
    out = pa.concat_tables(got)
    reference = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "ref").glob("part-*.parquet"))])
    twice = sum(1 for i in wanted["id"].to_pylist() if i % 11 == 0 and i % 4 != 0)  # rows asking for 2 samples
    assert out.num_rows == reference.num_rows == wanted.num_rows + twice
    assert out.column_names[: len(COMPARED) - 1] == [c for c in COMPARED if c != "topic"]
    assert _sorted(out) == _sorted(reference)
    errors = [e for e in out["error"].to_pylist() if e]
    assert len(errors) == 3 and sum("temperature" in e for e in errors) == 2


def test_build_processor_refuses_bad_configuration_before_any_work(tiny_model_dir, tmp_path, ray_local):
    import ray.data

    with pytest.raises(UserError, match=r"^ProcessorConfig: concurrency must be"):
        ProcessorConfig(model=str(tiny_model_dir), concurrency=(3, 1))
    with pytest.raises(UserError, match="temperature"):
        ProcessorConfig(model=str(tiny_model_dir), sampling_params={"temperature": -2})
    with pytest.raises(UserError, match="system_prompt"):
        ProcessorConfig(model=str(tiny_model_dir), system_prompt="be brief")
    with pytest.raises(UserError, match="chat template"):  # the tiny model's tokenizer has none
        build_processor(ProcessorConfig(model=str(tiny_model_dir), chat=True))
    with pytest.raises(UserError, match="max_new_tokens|context"):
        build_processor(ProcessorConfig(model=str(tiny_model_dir), sampling_params={"max_new_tokens": 100_000}))
    with pytest.raises(UserError):
        build_processor(ProcessorConfig(model=str(tmp_path / "missing")))

    # the dataset's columns, checked when the stage is appended (from its known schema), before any actor loads
    processor = build_processor(ProcessorConfig(model=str(tiny_model_dir), num_cpus=0.5))
    for columns, match in [
        ({"prompt": ["a b"], "x": [1]}, "id_column 'id' is not a column"),
        ({"id": [1.0], "prompt": ["a b"]}, "holds double: ids must be integers or strings"),
        ({"id": [1], "prompt": ["a b"], "text": ["t"]}, "input column.s. text have the names of output columns"),
    ]:
        with pytest.raises(UserError, match=match):
            processor(ray.data.from_arrow(pa.table(columns)))
    # two actors of one CPU each on the 2-CPU Ray leave no CPU to read with: Ray Data would wait forever
    starving = build_processor(ProcessorConfig(model=str(tiny_model_dir), concurrency=2, num_cpus=1))
    with pytest.raises(UserError, match="leaving none for reading"):
        starving(ray.data.from_arrow(pa.table({"id": [1], "prompt": ["a b"]})))


def test_a_row_that_makes_the_engine_raise_is_that_rows_error_row(tiny_model_dir, tmp_path, ray_local):
    """A batch the engine fails on is generated row by row: only the row at fault is an error row."""
    import ray.data

    from tests.test_batch import trigger_model

    model = trigger_model(tiny_model_dir, tmp_path / "trigger", " zebra quartz fjord")
    prompts = [" ".join(WORDS[i : i + 3]) for i in range(8)]
    prompts[5] = "the fox zebra quartz fjord"
    config = ProcessorConfig(
        model=str(model), trust_remote_code=True, sampling_params=SAMPLING, num_cpus=0.5, batch_size=8, **ENGINE
    )
    out = build_processor(config)(
        ray.data.from_arrow(pa.table({"id": list(range(8)), "prompt": prompts}))
    ).to_arrow_refs()
    table = pa.concat_tables(ray.get(out)).sort_by("id")
    errors = table["error"].to_pylist()
    assert "TypeError" in errors[5] and table["finish_reason"][5].as_py() == "error"
    assert all(e is None for i, e in enumerate(errors) if i != 5)
    assert all(n > 0 for i, n in enumerate(table["num_generated_tokens"].to_pylist()) if i != 5)
