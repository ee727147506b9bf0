"""The Ray generation job: invariance across layouts, faults, resume, bad input, replay and verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aitextgen_batch.batch.api import generate_dataset
from aitextgen_batch.batch.verify import replay_row, verify_output
from aitextgen_batch.config import flag
from aitextgen_batch.errors import UserError
from tests.conftest import WORDS

BASE = {"max_new_tokens": 6, "temperature": 1.0, "top_k": 0, "quiet": True}
# the reference job's layout: one actor, two shards, two samples per row
REF = {
    "num_actors": 1,
    "shard_rows": 64,
    "batch_size": 16,
    "num_return_sequences": 2,
    "keep_columns": ["topic"],
    **BASE,
}


def write_prompts(folder: Path, n_files: int = 3, rows: int = 40, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    i = start
    for f in range(n_files):
        ids, prompts = [], []
        for _ in range(rows):
            ids.append(f"item-{i:05d}")
            prompts.append(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 13)))
            i += 1
        pq.write_table(
            pa.table({"id": ids, "prompt": prompts, "topic": [p.split()[0] for p in prompts]}),
            folder / f"part{f}.parquet",
        )
    return folder


def generate_cmd(**flags) -> list[str]:
    """The `aitextgen-batch generate` command line for BASE's sampling plus `flags`."""
    argv = [sys.executable, "-m", "aitextgen_batch", "generate"]
    for name, value in {**BASE, **flags}.items():
        argv += [flag(name)] if value is True else [flag(name), str(value)]
    return argv


def kill_driver_after(cmd: list[str], done_count, at_least: int) -> None:
    """Run `cmd` in its own process group; once `done_count()` reaches `at_least`, SIGKILL the group: the
    driver and the local Ray it started."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and done_count() < at_least:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def texts(out: Path) -> dict:
    df = pd.read_parquet(out)
    assert not df.duplicated(["id", "sample_index"]).any()
    return {(r.id, r.sample_index): r.text.encode() for r in df.itertuples()}


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts"))


@pytest.fixture(scope="module")
def reference(ray_local, tiny_model_dir, prompts_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    s = generate_dataset(
        input=str(prompts_dir),
        output=str(out),
        model=str(tiny_model_dir),
        **REF,
    )
    assert s["status"] == "complete" and s["rows"] == 240
    return out


def test_output_schema_manifest_and_readers(reference, prompts_dir):
    df = pd.read_parquet(reference)
    assert len(df) == 240 and sorted(df.columns) == sorted(
        [
            "id",
            "sample_index",
            "prompt",
            "seed",
            "text",
            "num_prompt_tokens",
            "num_generated_tokens",
            "finish_reason",
            "error",
            "topic",
        ]
    )
    assert set(df.sample_index) == {0, 1} and df.error.isna().all()
    assert (df.num_generated_tokens > 0).all() and set(df.finish_reason) <= {"eos", "length"}
    src = pd.concat([pd.read_parquet(p) for p in sorted(prompts_dir.glob("*.parquet"))])
    merged = df.merge(src, on="id", suffixes=("", "_in"))
    assert len(merged) == 240 and (merged.prompt == merged.prompt_in).all() and (merged.topic == merged.topic_in).all()
    assert pq.read_table(reference).num_rows == 240  # pyarrow's dataset reader sees only result rows too
    job = json.loads((reference / "_job.json").read_text())
    assert job["status"] == "complete" and job["identity"]["model_fingerprint"].startswith("sha256:")
    assert job["versions"]["ray"] and job["identity"]["sampling"]["max_new_tokens"] == 6
    assert [s["state"] for s in job["shards"]] == ["done"] * 2 and sum(s["rows"] for s in job["shards"]) == 120
    assert sorted(os.listdir(reference / "_done")) == ["00000.json", "00001.json"]


@pytest.mark.slow
def test_text_identical_across_actors_shards_and_batch_size(reference, tiny_model_dir, prompts_dir, tmp_path):
    ref = texts(reference)
    out = tmp_path / "out"
    s = generate_dataset(
        input=str(prompts_dir),
        output=str(out),
        model=str(tiny_model_dir),
        num_actors=2,
        shard_rows=7,
        batch_size=1,
        num_return_sequences=2,
        **BASE,
    )
    assert s["status"] == "complete" and s["shards"] == 18
    assert texts(out) == ref


def test_rerun_skips_finished_shards_and_refuses_other_params(reference, tiny_model_dir, prompts_dir):
    before = {p.name: p.stat().st_mtime_ns for p in reference.glob("part-*.parquet")}
    s = generate_dataset(
        input=str(prompts_dir),
        output=str(reference),
        model=str(tiny_model_dir),
        **REF,
    )
    assert (s["status"], s["shards_skipped"], s["shards_done"]) == ("complete", 2, 2)
    assert {p.name: p.stat().st_mtime_ns for p in reference.glob("part-*.parquet")} == before
    with pytest.raises(UserError, match=r"holds a job made with a different sampling.*--overwrite"):
        generate_dataset(
            input=str(prompts_dir),
            output=str(reference),
            model=str(tiny_model_dir),
            shard_rows=64,
            num_return_sequences=2,
            keep_columns=["topic"],
            **{**BASE, "temperature": 0.5},
        )


def test_overwrite_starts_again(tiny_model_dir, prompts_dir, tmp_path, ray_local):
    out = tmp_path / "out"
    generate_dataset(input=str(prompts_dir / "part0.parquet"), output=str(out), model=str(tiny_model_dir), **BASE)
    s = generate_dataset(
        input=str(prompts_dir / "part0.parquet"),
        output=str(out),
        model=str(tiny_model_dir),
        overwrite=True,
        **{**BASE, "max_new_tokens": 3},
    )
    assert s["status"] == "complete" and s["shards_skipped"] == 0
    assert pd.read_parquet(out).num_generated_tokens.max() <= 3


def _worker_pids() -> list[int]:
    import psutil

    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any("GenerationWorker" in c for c in (p.info["cmdline"] or []))
    ]


@pytest.mark.slow
def test_actor_sigkilled_mid_job_is_restarted_and_output_is_exact(reference, tiny_model_dir, prompts_dir, tmp_path):
    out = tmp_path / "out"
    result = {}

    def run():
        result["summary"] = generate_dataset(
            input=str(prompts_dir),
            output=str(out),
            model=str(tiny_model_dir),
            num_actors=2,
            shard_rows=4,
            batch_size=4,
            num_return_sequences=2,
            **BASE,
        )

    t = threading.Thread(target=run)
    t.start()
    killed = None
    deadline = time.time() + 120
    while time.time() < deadline and killed is None:
        done = len(list((out / "_done").glob("*.json"))) if (out / "_done").exists() else 0
        pids = _worker_pids()
        if done >= 2 and pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    t.join(300)
    assert killed is not None, "no actor process found to kill"
    s = result["summary"]
    assert s["status"] == "complete" and s["shards_done"] == 30 and s["actor_restarts"] >= 1
    assert texts(out) == texts(reference)


@pytest.mark.slow
def test_killed_driver_loses_nothing_and_rerun_resumes(reference, tiny_model_dir, prompts_dir, tmp_path):
    out = tmp_path / "out"
    cmd = generate_cmd(
        input=prompts_dir,
        output=out,
        model=tiny_model_dir,
        num_actors=1,
        shard_rows=5,
        batch_size=4,
        num_return_sequences=2,
    )
    kill_driver_after(cmd, lambda: len(list(out.glob("_done/*.json"))), 3)
    finished = len(list(out.glob("_done/*.json")))
    assert 3 <= finished < 24
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    job = json.loads((out / "_job.json").read_text())
    assert job["status"] == "complete" and job["summary"]["shards_skipped"] >= finished
    assert texts(out) == texts(reference)
    assert not list(out.rglob(".*.tmp"))  # the interrupted run's temporary files were cleaned up


def test_bad_rows_become_error_rows(tiny_model_dir, tmp_path, ray_local):
    inp = tmp_path / "bad.parquet"
    prompts = ["the fox", None, "", "   ", " ".join(["zebras"] * 400), "a dog"]
    pq.write_table(pa.table({"id": list(range(6)), "prompt": prompts}), inp)
    out = tmp_path / "out"
    s = generate_dataset(input=str(inp), output=str(out), model=str(tiny_model_dir), **BASE)
    assert s["status"] == "complete" and s["rows"] == 6 and s["error_rows"] == 4
    df = pd.read_parquet(out).set_index("id").sort_index()
    assert (
        list(df.finish_reason) == ["length", "error", "error", "error", "error", "length"]
        or df.loc[[1, 2, 3, 4], "finish_reason"].eq("error").all()
    )
    assert df.loc[1, "error"] == "prompt is null" and df.loc[2, "error"] == "prompt is empty"
    assert "exceeds the model's context" in df.loc[4, "error"]
    assert df.loc[[0, 5], "error"].isna().all()


def test_bad_inputs_are_refused_before_anything_is_written(tiny_model_dir, prompts_dir, tmp_path, ray_local):
    out = tmp_path / "out"

    def refuse(inp, match, **kw):
        with pytest.raises(UserError, match=match):
            generate_dataset(input=str(inp), output=str(out), model=str(tiny_model_dir), **{**BASE, **kw})
        assert not out.exists()

    refuse(tmp_path / "nope", r"--input '.*nope' does not exist")
    refuse(
        prompts_dir,
        r"part0.parquet: no column 'text' \(--prompt-column\); its columns are: id, prompt, topic",
        prompt_column="text",
    )
    refuse(prompts_dir, r"no column 'colour' \(--keep-columns\)", keep_columns=["colour"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.parquet").write_bytes(b"this is not parquet at all")
    refuse(bad, r"a.parquet: not a readable Parquet file")
    dup = write_prompts(tmp_path / "dup", n_files=2, rows=5)
    pq.write_table(pa.table({"id": ["item-00002"], "prompt": ["x"], "topic": ["x"]}), dup / "part9.parquet")
    refuse(dup, r"duplicate id 'item-00002': .*part0.parquet row 2 and .*part9.parquet row 0")
    half = tmp_path / "half.parquet"
    half.write_bytes((prompts_dir / "part0.parquet").read_bytes()[:300])
    refuse(half, r"half.parquet: not a readable Parquet file")


def test_ids_derive_from_file_and_row_when_absent(tiny_model_dir, tmp_path, ray_local):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"prompt": ["the fox", "a dog", "seven wizards"]}), inp / "x.parquet")
    out = tmp_path / "out"
    generate_dataset(input=str(inp), output=str(out), model=str(tiny_model_dir), seed=3, **BASE)
    df = pd.read_parquet(out)
    assert sorted(df.id) == ["x.parquet:0", "x.parquet:1", "x.parquet:2"]
    row, res, match = replay_row(out, "x.parquet:1")
    assert match and res.text == row["text"]


def test_seed_column_is_used(tiny_model_dir, tmp_path, ray_local):
    from aitextgen_batch.generation import Engine, SamplingParams

    inp = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["the fox", "the fox"], "s": [11, 11]}), inp)
    out = tmp_path / "out"
    generate_dataset(input=str(inp), output=str(out), model=str(tiny_model_dir), seed_column="s", **BASE)
    df = pd.read_parquet(out).sort_values("id")
    assert list(df.seed) == [11, 11] and df.text.iloc[0] == df.text.iloc[1]
    eng = Engine.from_pretrained(str(tiny_model_dir), device="cpu")
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=0)
    assert eng.generate(["the fox"], [11], params, 1)[0].text == df.text.iloc[0]


def test_repeatedly_failing_shard_is_marked_failed_and_the_rest_finishes(tiny_model_dir, tmp_path, ray_local):
    inp = tmp_path / "in"
    write_prompts(inp, n_files=2, rows=10)
    # Corrupt the prompt values of the second file while its footer and id column stay readable: schema and
    # id checks pass, reading the prompts in the actor fails on every attempt.
    t = pq.read_table(inp / "part1.parquet")
    marker = "UNIQUEMARKERPROMPT"
    prompts = t.column("prompt").to_pylist()
    prompts[0] = marker
    pq.write_table(
        t.set_column(1, "prompt", pa.array(prompts)), inp / "part1.parquet", compression="none", use_dictionary=False
    )
    raw = bytearray((inp / "part1.parquet").read_bytes())
    at = raw.index(marker.encode())
    raw[at - 4 : at] = (0x7FFFFFF0).to_bytes(4, "little")
    (inp / "part1.parquet").write_bytes(bytes(raw))
    out = tmp_path / "out"
    s = generate_dataset(
        input=str(inp), output=str(out), model=str(tiny_model_dir), shard_rows=10, max_shard_attempts=2, **BASE
    )
    assert s["status"] == "failed" and s["shards_done"] == 1 and s["shards_failed"] == 1
    assert "failed 2 times" in s["failed"]["1"]
    assert len(pd.read_parquet(out)) == 10
    job = json.loads((out / "_job.json").read_text())
    assert [sh["state"] for sh in job["shards"]] == ["done", "failed"]


def test_verify_passes_on_real_output_and_fails_on_tampered(reference, tmp_path):
    import shutil

    report = verify_output(reference, sample=25)
    assert (report["checked"], report["mismatches"], report["duplicates"], report["missing"]) == (25, 0, 0, 0)
    row, res, match = replay_row(reference, "item-00042", 1)
    assert match and row["sample_index"] == 1
    bad = tmp_path / "tampered"
    shutil.copytree(reference, bad)
    job = json.loads((bad / "_job.json").read_text())
    job["output"] = str(bad)
    (bad / "_job.json").write_text(json.dumps(job))
    part = bad / "part-00000.parquet"
    t = pq.read_table(part)
    texts_col = t.column("text").to_pylist()
    texts_col = [x + "!" for x in texts_col]
    pq.write_table(t.set_column(t.schema.get_field_index("text"), "text", pa.array(texts_col)), part)
    report = verify_output(bad, sample=240)
    assert report["mismatches"] == 128 and report["mismatch_rate"] > 0.5
    rc = subprocess.run(
        [sys.executable, "-m", "aitextgen_batch", "verify", "--output", str(bad), "--sample", "20"],
        capture_output=True,
        text=True,
    )
    assert rc.returncode == 1 and "FAILED" in rc.stdout
    rc = subprocess.run(
        [sys.executable, "-m", "aitextgen_batch", "replay", "--output", str(bad), "--id", "item-00003"],
        capture_output=True,
        text=True,
    )
    assert rc.returncode == 1 and "MISMATCH" in rc.stdout
