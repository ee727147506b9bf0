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
from aitextgen_batch.cli import main
from aitextgen_batch.config import flag
from aitextgen_batch.errors import UserError
from tests.conftest import WORDS, free_port

BASE = {"max_new_tokens": 6, "temperature": 1.0, "top_k": 0, "quiet": True}
# Jobs that do not test Ray itself run in this process (`--in-process`, the same job layer and files): an actor
# process costs ~5 s of CPU to import torch and transformers, and the suite runs on 2 cores.
HERE = {**BASE, "in_process": True}
# the reference job's layout: two actors, two shards, two samples per row (the killed-driver run, whose texts must
# equal the reference's, uses one actor)
REF = {
    "num_actors": 2,
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
            "valid",
            "topic",
        ]
    )
    assert set(df.sample_index) == {0, 1} and df.error.isna().all() and df.valid.isna().all()
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


def test_the_manifest_holds_typed_sampling_params_and_reads_older_ones(tmp_path):
    """`Identity.sampling` is a `SamplingParams`: written as JSON and read back equal; a job written before some
    sampling fields existed reads with their defaults."""
    from aitextgen_batch.batch import manifest as mf
    from aitextgen_batch.generation.options import NUMERICS_VERSION, EngineConfig
    from aitextgen_batch.generation.params import SamplingParams
    from aitextgen_batch.storage import Location

    sampling = SamplingParams(max_new_tokens=9, temperature=0.5, stop=["\n\n", "END"], json_schema='{"type": "object"}')
    engine = EngineConfig(slots=8).resolved("cpu")
    job = mf.JobSpec(
        identity=mf.Identity(
            model_fingerprint="sha256:x",
            sampling=sampling,
            job_seed=3,
            columns=mf.Columns("prompt", "id", None, []),
            inputs=[["a.parquet", 2, 10, "ab" * 32]],
            shard_rows=1,
            engine=mf.Numerics.of(engine),
        ),
        output=str(tmp_path),
        model=mf.ModelSpec("m", None, False, False),
        files=[mf.InputFile("a.parquet", "a.parquet", 2)],
        has_id=True,
        id_type="string",
        keep_schema="",
        shards=[mf.ShardPlan(0, 1, [[0, 0, 1]]), mf.ShardPlan(1, 1, [[0, 1, 2]])],
        versions={},
    )
    out = Location(str(tmp_path))
    mf.write_job(out, job)
    back = mf.read_job(out)
    assert back == job and isinstance(back.identity.sampling, SamplingParams) and back.identity.sampling == sampling
    assert back.identity.engine == mf.Numerics("cpu", "float32", 8, 2, NUMERICS_VERSION)
    built = back.engine_config(refill=False, threads=2)
    assert (built.model, built.slots, built.prefill_rows, built.dtype, built.threads) == ("m", 8, 2, "float32", 2)
    data = json.loads((tmp_path / "_job.json").read_text())
    del data["identity"]["sampling"]["top_logprobs"], data["identity"]["sampling"]["stop_token_ids"]
    (tmp_path / "_job.json").write_text(json.dumps(data))
    assert mf.read_job(out).identity.sampling == sampling


@pytest.mark.slow
def test_text_identical_across_actors_shards_and_batch_size(reference, tiny_model_dir, prompts_dir, tmp_path):
    ref = texts(reference)
    out = tmp_path / "out"
    s = generate_dataset(
        input=f"{prompts_dir}/part[01].parquet",  # 80 of the reference's 120 rows, in another layout
        output=str(out),
        model=str(tiny_model_dir),
        num_actors=2,
        shard_rows=7,
        batch_size=1,
        num_return_sequences=2,
        **BASE,
    )
    assert s["status"] == "complete" and s["shards"] == 12
    got = texts(out)
    assert len(got) == 160 and got == {k: v for k, v in ref.items() if k in got}
    # without Ray (--in-process), the other 40 rows, in yet another layout: the same bytes
    s = generate_dataset(
        input=f"{prompts_dir}/part2.parquet",
        output=str(tmp_path / "here"),
        model=str(tiny_model_dir),
        shard_rows=9,
        num_return_sequences=2,
        in_process=True,
        **BASE,
    )
    assert s["status"] == "complete" and s["shards"] == 5 and s["actors"] == 1
    here = texts(tmp_path / "here")
    assert len(here) == 80 and here == {k: v for k, v in ref.items() if k in here}


def test_small_shards_run_together_to_fill_the_slots(reference, tiny_model_dir, prompts_dir, tmp_path, monkeypatch):
    """Shards smaller than the slots go to an actor together (`executor.queue.ShardQueue.take`): one engine call keeps
    the slots full across them, yet each shard gets its own part file and record, and the bytes are the reference's. On
    Ray a small job is still shared among the actors."""
    from aitextgen_batch.generation import Engine

    calls: list[int] = []
    generate = Engine.generate

    def spy(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", spy)
    out = tmp_path / "here"
    common = dict(input=f"{prompts_dir}/part0.parquet", model=str(tiny_model_dir), num_return_sequences=2, **BASE)
    s = generate_dataset(output=str(out), shard_rows=3, slots=16, prefill_rows=4, **{**common, "in_process": True})
    # 40 rows in 14 shards of 3 (the last 1) x 2 samples; a group fills 2 x 16 slots: 6 shards (36 items), 6, 2
    assert (s.status, s.shards, s.shards_done) == ("complete", 14, 14) and calls == [36, 36, 8]
    assert len(list(out.glob("part-*.parquet"))) == len(list((out / "_done").glob("*.json"))) == 14
    # at the reference's slots the bytes are the reference's; on Ray the 14 shards go to both actors
    calls.clear()
    s = generate_dataset(output=str(tmp_path / "ray"), shard_rows=3, num_actors=2, **common)
    assert s.status == "complete" and s.shards_done == 14
    got = texts(tmp_path / "ray")
    assert len(got) == 80 and got == {k: v for k, v in texts(reference).items() if k in got}
    done = [json.loads(p.read_text()) for p in (tmp_path / "ray" / "_done").glob("*.json")]
    assert len({d["pid"] for d in done}) == 2


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


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_an_edited_input_is_not_resumed_into_mixed_output(tiny_model_dir, tmp_path, capsys, kind):
    def write(prompts: list[str]) -> Path:
        path = tmp_path / f"in.{kind}"
        rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)]
        if kind == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    inp = write([f"the fox {w}" for w in WORDS[:6]])
    out = tmp_path / "out"
    job = dict(input=str(inp), output=str(out), model=str(tiny_model_dir), shard_rows=2, **HERE)
    assert generate_dataset(**job)["status"] == "complete"
    (out / "_done/00001.json").unlink()  # as after an interrupted run
    (out / "part-00001.parquet").unlink()
    write([f"a lazy dog {w}" for w in WORDS[6:12]])  # other prompts, the same row count
    edited = rf"holds a job made from other input: in\.{kind} changed since the job read it"
    with pytest.raises(UserError, match=edited):
        generate_dataset(**job)
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet", "part-00002.parquet"]
    # verify notices too: the output no longer answers to the input
    capsys.readouterr()
    assert main(["verify", "--output", str(out), "--sample", "2"]) == 1
    assert f"input {inp} changed since the job read it" in capsys.readouterr().out
    s = generate_dataset(**job, overwrite=True)
    assert s["status"] == "complete" and s["shards_skipped"] == 0
    assert set(pd.read_parquet(out).prompt) == {f"a lazy dog {w}" for w in WORDS[6:12]}


def test_an_output_folder_holding_files_that_are_not_the_jobs_is_refused(tiny_model_dir, tmp_path):
    inp = write_prompts(tmp_path / "in", n_files=1, rows=4)
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "README.txt").write_text("someone else's notes")
    (out / "notes" / "old.parquet").write_bytes(b"not ours")
    job = dict(input=str(inp), output=str(out), model=str(tiny_model_dir), **HERE)
    with pytest.raises(UserError, match=r"holds files that are not this job's \(README.txt, notes/old.parquet\)"):
        generate_dataset(**job)
    with pytest.raises(UserError, match=r"holds files that are not this job's \(README.txt, notes/old.parquet\)"):
        generate_dataset(**job, overwrite=True)  # --overwrite deletes a job's files, never someone else's
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["README.txt", "notes", "notes/old.parquet"]
    # hidden and bookkeeping names are skipped by every reader: they may stay
    (out / "README.txt").rename(out / ".README.txt")
    (out / "notes").rename(out / "_notes")
    assert generate_dataset(**job)["status"] == "complete" and len(pd.read_parquet(out)) == 4
    # a file dropped in after the job ran is named on the rerun, before anything is written
    (out / "summary.csv").write_text("id,score\n")
    with pytest.raises(UserError, match=r"holds files that are not this job's \(summary.csv\)"):
        generate_dataset(**job)


def _copy_job(job_dir: Path, dest: Path) -> Path:
    """A copy of a finished job's folder that is a job of its own (its manifest names its new place)."""
    import shutil

    shutil.copytree(job_dir, dest)
    job = json.loads((dest / "_job.json").read_text())
    job["output"] = str(dest)
    (dest / "_job.json").write_text(json.dumps(job))
    return dest


def test_overwrite_starts_again(reference, tiny_model_dir, prompts_dir, tmp_path):
    out = _copy_job(reference, tmp_path / "out")
    s = generate_dataset(
        input=str(prompts_dir),
        output=str(out),
        model=str(tiny_model_dir),
        overwrite=True,
        in_process=True,
        **{**REF, "max_new_tokens": 3},
    )
    assert s["status"] == "complete" and s["shards_skipped"] == 0 and s["shards_done"] == 2
    assert pd.read_parquet(out).num_generated_tokens.max() <= 3


def _worker_pids(task: str = "") -> list[int]:
    """Generation actor processes (Ray titles them `ray::GenerationWorker`, `ray::GenerationWorker.run` while a shard
    runs, `ray::GenerationWorker.__init__` while the model loads); with `task`, only those running it."""
    import psutil

    title = "ray::GenerationWorker" + (f".{task}" if task else "")
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(c.strip() == title or (not task and c.startswith(title)) for c in (p.info["cmdline"] or []))
    ]


def _busy_worker_pids() -> list[int]:
    """Actor processes running a shard now: never an idle actor, nor one of an earlier job still shutting down."""
    return _worker_pids("run")


def _done_pids(out: Path) -> set[int]:
    """The processes that wrote the finished shards (each completion record names its actor's pid)."""
    return {json.loads(p.read_text())["pid"] for p in out.glob("_done/*.json")}


def _in_thread(**options):
    """Start `generate_dataset(**options)` in a thread; returns (thread, dict that gets the summary)."""
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("summary", generate_dataset(**options)))
    t.start()
    return t, result


def _wait_for(what, timeout: float = 120):
    """Poll `what()` until it is truthy (returned) or `timeout` seconds pass (None)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.02)
    return None


@pytest.mark.slow
def test_actor_sigkilled_mid_job_is_restarted_takes_shards_again_and_output_is_exact(
    reference, tiny_model_dir, prompts_dir, tmp_path
):
    out = tmp_path / "out"
    t, result = _in_thread(
        input=str(prompts_dir), output=str(out), model=str(tiny_model_dir), num_actors=2, shard_rows=4, batch_size=4,
        num_return_sequences=2, **BASE,
    )  # fmt: skip
    killed = _wait_for(lambda: len(list(out.glob("_done/*.json"))) >= 2 and _busy_worker_pids())
    assert killed, "no actor process found to kill"
    others = [p for p in _worker_pids() if p != killed[0]]
    os.kill(killed[0], signal.SIGKILL)
    # The other actor is paused, so the shards left can only be done by the restarted one: it must take work again.
    for p in others:
        os.kill(p, signal.SIGSTOP)
    try:
        back = _wait_for(lambda: _done_pids(out) - {killed[0], *others}, timeout=90)
    finally:
        for p in others:
            os.kill(p, signal.SIGCONT)
    t.join(300)
    assert back, "the restarted actor never ran a shard again"
    s = result["summary"]
    assert s["status"] == "complete" and s["shards_done"] == 30 and s["actor_restarts"] >= 1 and s["actors"] == 2
    assert texts(out) == texts(reference)


@pytest.mark.slow
def test_the_only_actor_killed_while_loading_and_mid_job_comes_back(tiny_model_dir, tmp_path, ray_local, capsys):
    inp = write_prompts(tmp_path / "in", n_files=1, rows=48)
    out = tmp_path / "out"
    # 4 slots: shards of 4 rows run one at a time (smaller shards would be grouped to fill the slots)
    job = dict(input=str(inp), model=str(tiny_model_dir), num_actors=1, shard_rows=4, slots=4, **BASE)
    t, result = _in_thread(output=str(out), **job)
    loading = _wait_for(lambda: _worker_pids("__init__"))
    assert loading, "no actor process found loading the model"
    os.kill(loading[0], signal.SIGKILL)
    busy = _wait_for(lambda: len(list(out.glob("_done/*.json"))) >= 2 and _busy_worker_pids())
    assert busy, "the actor killed while loading never ran a shard"
    os.kill(busy[0], signal.SIGKILL)
    t.join(300)
    s = result["summary"]
    assert s["status"] == "complete" and s["shards_done"] == 12 and s["shards_failed"] == 0
    assert s["actor_restarts"] == 1 and s["actors"] == 1 and len(_done_pids(out)) >= 2
    err = capsys.readouterr().err
    assert "actor 0 died while generating shard" in err and "actor 0 is back after" in err
    # the restarted actor's rows are the bytes an undisturbed run makes
    generate_dataset(output=str(tmp_path / "here"), **{**job, **HERE})
    assert texts(out) == texts(tmp_path / "here")


@pytest.mark.slow
def test_killed_driver_loses_nothing_and_rerun_resumes(tiny_model_dir, prompts_dir, tmp_path, ray_address):
    out = tmp_path / "out"
    # 4 slots: shards of 5 rows x 2 samples run one at a time (smaller shards would be grouped to fill the slots)
    job = dict(model=tiny_model_dir, num_actors=1, shard_rows=5, slots=4, num_return_sequences=2)
    cmd = generate_cmd(
        input=prompts_dir / "part1.parquet",
        output=out,
        address=ray_address,  # the driver joins the session's Ray: killing it kills its actors, not the cluster
        **job,
    )
    kill_driver_after(cmd, lambda: len(list(out.glob("_done/*.json"))), 3)
    finished = len(list(out.glob("_done/*.json")))
    assert 3 <= finished < 8
    # the rerun (the same job layer, here in this process without Ray) picks up where the killed one stopped
    job = {**job, "model": str(tiny_model_dir)}
    again = generate_dataset(input=str(prompts_dir / "part1.parquet"), output=str(out), **job, **HERE)
    assert again["status"] == "complete"
    state = json.loads((out / "_job.json").read_text())
    assert state["status"] == "complete" and state["summary"]["shards_skipped"] >= finished
    generate_dataset(input=str(prompts_dir / "part1.parquet"), output=str(tmp_path / "whole"), **job, **HERE)
    got = texts(out)
    assert len(got) == 80 and got == texts(tmp_path / "whole")  # the bytes of an uninterrupted run
    assert not list(out.rglob(".*.tmp"))  # the interrupted run's temporary files were cleaned up


def _invalid_utf8_strings(values: list):
    """A string column holding the given bytes unchecked (as a writer that skips validation leaves them)."""
    return pa.array(values, pa.binary()).view(pa.string())


def test_bad_rows_become_error_rows(tiny_model_dir, tmp_path, ray_local):
    inp = tmp_path / "bad.parquet"
    prompts = [b"the fox", None, b"", b"   ", " ".join(["zebras"] * 400).encode(), b"a dog", b"the \xff\xfe dog"]
    pq.write_table(pa.table({"id": list(range(7)), "prompt": _invalid_utf8_strings(prompts)}), inp)
    out = tmp_path / "out"
    s = generate_dataset(input=str(inp), output=str(out), model=str(tiny_model_dir), **HERE)
    assert s["status"] == "complete" and s["rows"] == 7 and s["error_rows"] == 5
    df = pd.read_parquet(out).set_index("id").sort_index()
    assert list(df.finish_reason) == ["length", "error", "error", "error", "error", "length", "error"]
    assert df.loc[1, "error"] == "prompt is null" and df.loc[2, "error"] == "prompt is empty"
    assert df.loc[3, "error"] == "prompt is empty"
    assert "exceeds the model's context" in df.loc[4, "error"]
    # one undecodable row is an error row naming its file and row; the good rows of its shard are kept
    assert df.loc[6, "error"] == "prompt is not valid UTF-8 (invalid start byte at byte 4) in bad.parquet row 6"
    assert df.loc[[0, 5], "error"].isna().all() and (df.loc[[0, 5], "num_generated_tokens"] > 0).all()


def test_a_job_whose_every_row_failed_is_not_a_success(tiny_model_dir, tmp_path, ray_local):
    inp = tmp_path / "empty-prompts.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["", "  "]}), inp)
    out = tmp_path / "out"
    s = generate_dataset(input=str(inp), output=str(out), model=str(tiny_model_dir), **HERE)
    assert s.status == "failed" and s.error_rows == s.rows == 2  # `generate` exits 1 unless the status is complete
    job = json.loads((out / "_job.json").read_text())
    assert job["status"] == "failed" and job["summary"]["error_rows"] == 2
    first = "empty-prompts.parquet row 0: prompt is empty"
    assert job["failed"]["all"] == f"every one of the 2 rows is an error row; the first: {first}"


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
    # nothing to do is refused, not a "complete" job of 0 shards
    (tmp_path / "empty").mkdir()
    refuse(tmp_path / "empty", r"--input '.*empty' matches no Parquet files")
    refuse(f"{prompts_dir}/*.parqet", r"matches no Parquet files")
    no_rows = pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())})
    pq.write_table(no_rows, tmp_path / "0.parquet")
    refuse(tmp_path / "0.parquet", r"holds no rows")
    # a prompt column that is not text would make every row an error row
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": [1, 2]}), tmp_path / "ints.parquet")
    refuse(tmp_path / "ints.parquet", r"ints.parquet: the prompt column 'prompt' \(--prompt-column\) holds int64")
    pq.write_table(pa.table({"id": ["a"], "prompt": [["x", "y"]]}), tmp_path / "lists.parquet")
    refuse(tmp_path / "lists.parquet", r"holds list<.*: string>, not text")
    # ids that are not valid UTF-8 are named with their file and row
    pq.write_table(pa.table({"id": _invalid_utf8_strings([b"ok", b"\xff"]), "prompt": ["a", "b"]}), tmp_path / "u.pq")
    refuse(tmp_path / "u.pq", r"u.pq row 1: the id \(--id-column 'id'\) is not valid UTF-8")
    # more new tokens than the model's context (256) can hold
    room = r"max_new_tokens=1000000 leaves no room for a prompt in the model's context of 256"
    refuse(prompts_dir, room, max_new_tokens=10**6)
    # an output inside the input folder would read its own results on a rerun
    with pytest.raises(UserError, match=r"--output '.*/results' is inside --input"):
        generate_dataset(input=str(prompts_dir), output=str(prompts_dir / "results"), model=str(tiny_model_dir), **BASE)
    assert not (prompts_dir / "results").exists()
    # more actors than the cluster (2 CPUs) can place would never start
    refuse(prompts_dir, r"--num-actors 64 needs at least 64 CPUs \(one each\) but the Ray cluster has 2", num_actors=64)
    # one more than fits, with more shards than actors (what used to hang: shards queued on an actor never placed)
    refuse(prompts_dir, r"--num-actors 3 needs at least 3 CPUs", num_actors=3, shard_rows=20)


_OPENED: dict[str, list] = {}


def _watch_opens(suffix: str) -> list:
    """A list collecting every path this process opens that ends in `suffix` (audit hooks stay for the session)."""
    if not _OPENED:

        def hook(event, args):
            if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
                for sfx, seen in _OPENED.items():
                    if os.fsdecode(args[0]).endswith(sfx):
                        seen.append(os.fsdecode(args[0]))

        sys.addaudithook(hook)
    _OPENED[suffix] = []
    return _OPENED[suffix]


def test_pickle_weights_are_never_opened_without_allow_pickle(tiny_model_dir, tmp_path, ray_local, capsys):
    """No process may read a folder's `pytorch_model.bin` unless the user passed --allow-pickle.

    An audit hook records every file this process (the job's driver) opens: the .bin is not among them, and the
    job is refused before any actor starts. The hook does see the file once the user opts in.
    """
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    opened = _watch_opens("pytorch_model.bin")
    inp = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["the fox"]}), inp)
    with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        generate_dataset(input=str(inp), output=str(tmp_path / "out"), model=str(folder), **BASE)
    assert opened == [] and not (tmp_path / "out").exists()
    assert main(["info", str(folder)]) == 2 and opened == []
    assert "--allow-pickle" in capsys.readouterr().err
    from aitextgen_batch.models.provenance import inspect_source

    inspect_source(str(folder), allow_pickle=True)  # the user's explicit opt-in: now it is read
    assert opened and opened[0].endswith("pytorch_model.bin")


def test_truncated_part_file_is_noticed_and_redone(reference, tiny_model_dir, prompts_dir, tmp_path, capsys):
    out = _copy_job(reference, tmp_path / "out")
    part = out / "part-00001.parquet"
    whole = part.read_bytes()
    record = json.loads((out / "_done" / "00001.json").read_text())
    assert record["bytes"] == len(whole) and len(record["sha256"]) == 64
    part.write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    assert main(["verify", "--output", str(out), "--sample", "1"]) == 1  # it used to die with an ArrowInvalid traceback
    assert "damaged: part-00001.parquet differs from its completion record" in capsys.readouterr().out
    # redone without Ray (--in-process: the same job, another executor): not trusted, redone, byte-identical
    s = generate_dataset(input=str(prompts_dir), output=str(out), model=str(tiny_model_dir), in_process=True, **REF)
    assert (s["status"], s["shards_skipped"], s["shards_done"]) == ("complete", 1, 2)
    assert part.read_bytes() == whole
    assert texts(out) == texts(reference)


def test_a_dashboard_url_as_the_ray_address_is_one_line_before_ray(tiny_model_dir, prompts_dir, tmp_path, capsys):
    argv = ["generate", "--input", str(prompts_dir), "--output", str(tmp_path / "out"), "--model", str(tiny_model_dir)]
    assert main([*argv, "--address", "http://127.0.0.1:8265"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--address http://127.0.0.1:8265 is a Ray dashboard URL" in err
    os.environ["RAY_ADDRESS"] = "https://head.example:8265"
    try:
        assert main(argv) == 2
    finally:
        del os.environ["RAY_ADDRESS"]
    assert "$RAY_ADDRESS https://head.example:8265 is a Ray dashboard URL" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(120)
def test_a_glob_without_a_folder_reads_the_current_folder_like_a_shell_and_never_hangs(
    tiny_model_dir, tmp_path, monkeypatch
):
    data = write_prompts(tmp_path / "data", n_files=2, rows=3)
    write_prompts(data / "nested", n_files=1, rows=3, start=100)  # `*.parquet` does not reach into subfolders
    monkeypatch.chdir(data)
    flags = ["--model", str(tiny_model_dir), "--max-new-tokens", "4", "--in-process", "--quiet"]
    # the output lies in the folder the glob reads, but the glob cannot match its part files: accepted, and a rerun
    # reads the same two files
    for _ in range(2):
        assert main(["generate", "--input", "*.parquet", "--output", "out", *flags]) == 0
    assert sorted(pd.read_parquet(data / "out").id) == [f"item-{i:05d}" for i in range(6)]
    s = generate_dataset(input="n*/*.parquet", output=str(tmp_path / "nested-out"), **HERE, model=str(tiny_model_dir))
    assert s["rows"] == 3 and set(pd.read_parquet(tmp_path / "nested-out").id) == {
        "item-00100",
        "item-00101",
        "item-00102",
    }
    # a glob that would read the output's part files on a rerun is refused
    with pytest.raises(UserError, match=r"--output 'results' is inside --input '\*/\*\.parquet'"):
        generate_dataset(input="*/*.parquet", output="results", **HERE, model=str(tiny_model_dir))


def test_checks_run_before_ray_and_a_dead_address_is_an_error_not_a_hang(tiny_model_dir, prompts_dir, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    cmd = generate_cmd(input=tmp_path / "nope.parquet", output=tmp_path / "out", address=dead)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr and dead not in r.stderr  # inputs first
    cmd = generate_cmd(input=prompts_dir / "part0.parquet", output=tmp_path / "out", model=tiny_model_dir, address=dead)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"no Ray cluster answers at {dead}" in r.stderr and "leave --address and RAY_ADDRESS unset" in r.stderr
    assert time.monotonic() - start < 60 and not (tmp_path / "out").exists()


def test_a_stale_ray_current_cluster_file_is_ignored(tiny_model_dir, tmp_path):
    """No --address and no RAY_ADDRESS: `generate` starts a new local Ray (`connect_ray`, which `finetune` uses too),
    even where Ray's temp dir names a dead head (a bare `ray.init()` waited for it for ever)."""
    import shutil
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    stale = f"127.0.0.1:{free_port()}"
    inp, out = tmp_path / "p.parquet", tmp_path / "out"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["the fox", "a lazy dog"]}), inp)
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(stale)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = str(ray_tmp)
        cmd = generate_cmd(input=inp, output=out, model=tiny_model_dir, num_actors=1)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert sorted(pd.read_parquet(out).id) == ["a", "b"]
        assert list(ray_tmp.glob("ray/session_*")), "the job's Ray was not started under RAY_TMPDIR"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ctrl_c_says_how_to_resume(tiny_model_dir, prompts_dir, tmp_path, ray_address):
    out = tmp_path / "out"
    cmd = generate_cmd(
        input=prompts_dir, output=out, model=tiny_model_dir, address=ray_address, num_actors=1, shard_rows=2
    )
    # The default SIGINT disposition, as in a terminal (a background shell would leave the child ignoring it).
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "_job.json").exists():  # the job has started
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted. Finished shards are kept: rerun the same command to resume." in err
    assert "Traceback" not in err


def test_ids_derive_from_file_and_row_when_absent(tiny_model_dir, tmp_path, ray_local):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"prompt": ["the fox", "a dog", "seven wizards"]}), inp / "x.parquet")
    out = tmp_path / "out"
    generate_dataset(input=str(inp), output=str(out), model=str(tiny_model_dir), seed=3, **HERE)
    df = pd.read_parquet(out)
    assert sorted(df.id) == ["x.parquet:0", "x.parquet:1", "x.parquet:2"]
    row, res, match = replay_row(out, "x.parquet:1")
    assert match and res.text == row["text"]


def test_seed_column_is_used(tiny_model_dir, tmp_path, ray_local, capsys):
    from aitextgen_batch.generation import Engine, SamplingParams

    inp = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["the fox", "the fox"], "s": [11, 11]}), inp)
    out = tmp_path / "out"
    generate_dataset(input=str(inp), output=str(out), model=str(tiny_model_dir), seed_column="s", **HERE)
    df = pd.read_parquet(out).sort_values("id")
    assert list(df.seed) == [11, 11] and df.text.iloc[0] == df.text.iloc[1]
    eng = Engine.from_pretrained(str(tiny_model_dir), device="cpu")
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=0)
    assert eng.generate(["the fox"], [11], params, 1)[0].text == df.text.iloc[0]
    # this job's ids are integers: a non-integer --id is a user error, one line, not a traceback
    capsys.readouterr()
    assert main(["replay", "--output", str(out), "--id", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--id 'abc': this job's ids are integers (column 'id'); pass an integer" in err


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
        input=str(inp), output=str(out), model=str(tiny_model_dir), shard_rows=10, max_shard_attempts=2, **HERE
    )
    assert s["status"] == "failed" and s["shards_done"] == 1 and s["shards_failed"] == 1
    assert "failed 2 times" in s["failed"]["1"]
    assert len(pd.read_parquet(out)) == 10
    job = json.loads((out / "_job.json").read_text())
    assert [sh["state"] for sh in job["shards"]] == ["done", "failed"]


TRIGGER_CONFIG = """from transformers import GPT2Config


class TriggerConfig(GPT2Config):
    model_type = "trigger-gpt2"
"""
TRIGGER_MODEL = """import functools

import torch
from transformers import GPT2LMHeadModel

from .configuration_trigger import TriggerConfig

TRIGGER = {ids}


class TriggerModel(GPT2LMHeadModel):
    config_class = TriggerConfig

    @functools.wraps(GPT2LMHeadModel.forward)
    def forward(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] >= len(TRIGGER):
            windows = ids.unfold(-1, len(TRIGGER), 1)
            if bool((windows == torch.tensor(TRIGGER, device=ids.device)).all(-1).any()):
                raise TypeError("the trigger phrase reached the model")
        return super().forward(*args, **kwargs)
"""


def trigger_model(tiny_model_dir: Path, folder: Path, phrase: str) -> Path:
    """The tiny GPT-2 as remote code (`--trust-remote-code`) whose forward raises TypeError on `phrase`'s tokens."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(tiny_model_dir, folder)
    ids = AutoTokenizer.from_pretrained(folder)(phrase, add_special_tokens=False)["input_ids"]
    (folder / "configuration_trigger.py").write_text(TRIGGER_CONFIG)
    (folder / "modeling_trigger.py").write_text(TRIGGER_MODEL.format(ids=ids))
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="trigger-gpt2",
        architectures=["TriggerModel"],
        auto_map={
            "AutoConfig": "configuration_trigger.TriggerConfig",
            "AutoModelForCausalLM": "modeling_trigger.TriggerModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_an_engine_error_fails_its_shard_the_same_in_process_and_on_ray(tiny_model_dir, tmp_path, ray_local, capsys):
    """One executor rule, two places to run it: the same faulty input (one row whose prompt makes the model raise)
    through `--in-process` and through Ray gives the same exit code, `_job.json` status, shard states, failed shard and
    error; the other shards finish."""
    model = trigger_model(tiny_model_dir, tmp_path / "trigger", " zebra quartz fjord")
    inp = tmp_path / "in"
    inp.mkdir()
    prompts = [f"the fox {w}" for w in WORDS[:8]]
    prompts[5] = "the fox zebra quartz fjord"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(8)], "prompt": prompts}), inp / "p.parquet")
    seen = {}
    for where, flags in {"in-process": ["--in-process"], "ray": ["--num-actors", "1"]}.items():
        out = tmp_path / where
        argv = ["generate", "--input", str(inp), "--output", str(out), "--model", str(model), "--trust-remote-code"]
        argv += ["--shard-rows", "2", "--max-shard-attempts", "2", "--max-new-tokens", "4", "--quiet", *flags]
        code = main(argv)
        job = json.loads((out / "_job.json").read_text())
        counts = {k: job["summary"][k] for k in ("shards_done", "shards_failed", "retries", "rows", "status")}
        seen[where] = (code, job["status"], [s["state"] for s in job["shards"]], job["failed"], counts)
        assert sorted(pd.read_parquet(out).id) == [f"r{i}" for i in range(8) if i not in (4, 5)]
    assert seen["in-process"] == seen["ray"]
    code, status, states, failed, counts = seen["ray"]
    assert (code, status, states) == (1, "failed", ["done", "done", "failed", "done"])
    assert failed == {"2": "failed 2 times; last error: the trigger phrase reached the model"}
    assert counts == {"shards_done": 3, "shards_failed": 1, "retries": 1, "rows": 6, "status": "failed"}


def test_verify_passes_on_real_output_and_fails_on_tampered(reference, tmp_path, capsys):
    import hashlib

    report = verify_output(reference, sample=25)
    assert (report["checked"], report["mismatches"], report["duplicates"], report["missing"]) == (25, 0, 0, 0)
    assert report["damaged_files"] == 0
    row, res, match = replay_row(reference, "item-00042", 1)
    assert match and row["sample_index"] == 1
    bad = _copy_job(reference, tmp_path / "tampered")
    part = bad / "part-00000.parquet"
    t = pq.read_table(part)
    texts_col = t.column("text").to_pylist()
    texts_col = [x + "!" for x in texts_col]
    pq.write_table(t.set_column(t.schema.get_field_index("text"), "text", pa.array(texts_col)), part)
    # changed behind the records' back: named as damaged, never trusted
    report = verify_output(bad, sample=240)
    assert report["damaged_files"] == 1 and "part-00000.parquet" in report["damaged"]
    # changed with matching records (as a run on other hardware would write): the regenerated rows disagree
    record = json.loads((bad / "_done" / "00000.json").read_text())
    blob = part.read_bytes()
    record.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (bad / "_done" / "00000.json").write_text(json.dumps(record))
    report = verify_output(bad, sample=240)
    assert report["damaged_files"] == 0 and report["mismatches"] == 128 and report["mismatch_rate"] > 0.5
    capsys.readouterr()
    assert main(["verify", "--output", str(bad), "--sample", "20"]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert main(["replay", "--output", str(bad), "--id", "item-00003"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_a_job_of_older_engine_arithmetic_is_not_replayed_or_resumed(reference, tiny_model_dir, prompts_dir, tmp_path):
    """A job written before the engine's arithmetic changed cannot be reproduced: verify, replay and a rerun refuse it
    with the way out, instead of reporting every row as a mismatch. Version 2: full-length eager attention (before
    grouped, chunked attention); version 1: no prefill rows, no version."""
    from aitextgen_batch.generation.options import NUMERICS_VERSION

    for older in (2, 1):
        old = _copy_job(reference, tmp_path / f"v{older}")
        job = json.loads((old / "_job.json").read_text())
        assert job["identity"]["engine"]["version"] == NUMERICS_VERSION == 3
        assert job["identity"]["engine"]["prefill_rows"] >= 2
        if older == 1:
            del job["identity"]["engine"]["version"], job["identity"]["engine"]["prefill_rows"]
        else:
            job["identity"]["engine"]["version"] = older
        (old / "_job.json").write_text(json.dumps(job))
        with pytest.raises(UserError, match=f"version {older} of the engine's arithmetic.*computes version 3"):
            verify_output(old, sample=5)
        with pytest.raises(UserError, match=f"version {older} of the engine's arithmetic"):
            replay_row(old, "item-00042", 0)
        with pytest.raises(UserError, match="holds a job made with a different engine.*--overwrite"):
            generate_dataset(input=str(prompts_dir), output=str(old), model=str(tiny_model_dir), **REF)
