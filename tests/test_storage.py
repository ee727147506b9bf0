"""Object storage: a real S3-compatible server (moto, on 127.0.0.1) for inputs, outputs, caches and models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from aitextgen_batch.batch.api import generate_dataset
from aitextgen_batch.batch.verify import verify_output
from aitextgen_batch.storage import Location, upload_folder
from tests.test_batch import BASE, HERE, generate_cmd, kill_driver_after, write_prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback with bucket `bkt`; AWS_* variables point at it for this module."""
    import pyarrow.fs as pafs

    port = _free_port()
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AITEXTGEN_BATCH_CACHE": str(tmp_path_factory.mktemp("dlcache")),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir("bkt")
        yield env
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reference_texts(model_dir, prompts_dir) -> dict:
    """What each row's text must be, from the engine alone (no job): seeds derive from job seed 0, id and sample 0."""
    from aitextgen_batch.generation import Engine, SamplingParams, derive_seed

    df = pd.concat([pd.read_parquet(p) for p in sorted(prompts_dir.glob("*.parquet"))])
    params = SamplingParams(max_new_tokens=BASE["max_new_tokens"], temperature=BASE["temperature"], top_k=BASE["top_k"])
    seeds = [derive_seed(0, i, 0) for i in df.id]
    results = Engine.from_pretrained(str(model_dir), device="cpu").generate(list(df.prompt), seeds, params, 64)
    return {(i, 0): r.text.encode() for i, r in zip(df.id, results, strict=True)}


@pytest.mark.slow
def test_generate_s3_to_s3_kill_resume_and_read_with_pandas(s3, tiny_model_dir, tmp_path):
    """A run killed while it writes to S3, then resumed. Ray is not the subject here (test_batch kills a Ray
    driver): both runs are `--in-process`, the same job layer and files."""
    local_in = write_prompts(tmp_path / "in", n_files=2, rows=30)
    inp = "s3://bkt/prompts"
    upload_folder(local_in, inp)
    model = "s3://bkt/models/tiny"
    upload_folder(tiny_model_dir, model)

    out = "s3://bkt/results/run1"
    cmd = generate_cmd(input=inp, output=out, model=model, shard_rows=5, in_process=True)
    loc = Location(out)
    kill_driver_after(cmd, lambda: len(loc.list("_done")), 2)
    finished = len(loc.list("_done"))
    assert 2 <= finished < 12
    again = generate_dataset(input=inp, output=out, model=model, shard_rows=5, **HERE)
    assert again["status"] == "complete" and again["shards_skipped"] >= finished
    assert not loc.list(pattern=".*")  # nothing temporary on the object store
    df = pd.read_parquet(loc.path(), filesystem=loc.fs)
    assert len(df) == 60 and not df.duplicated(["id", "sample_index"]).any()
    assert {(r.id, r.sample_index): r.text.encode() for r in df.itertuples()} == _reference_texts(
        tiny_model_dir, local_in
    )
    assert pq.read_table(loc.path(), filesystem=loc.fs).num_rows == 60
    report = verify_output(out, sample=10)
    assert (report["mismatches"], report["duplicates"], report["missing"]) == (0, 0, 0)


def test_token_cache_on_s3(s3, tokenizer_dir, corpus_file):
    from aitextgen_batch.cli import main
    from aitextgen_batch.data import TokenDataset

    upload_folder(corpus_file.parent, "s3://bkt/corpus")
    uri = "s3://bkt/caches/c1"
    assert (
        main(
            [
                "prepare",
                "--input",
                "s3://bkt/corpus/corpus.txt",
                "--tokenizer",
                str(tokenizer_dir),
                "--output",
                uri,
                "--num-shards",
                "3",
                "--no-compress",
            ]
        )
        == 0
    )
    names = Location(uri).list()
    assert "index.json" in names and len([n for n in names if n.startswith("shard-")]) == 3
    ds = TokenDataset(uri, tokenizer=tokenizer_dir)
    local = TokenDataset.build(
        [corpus_file], tokenizer_dir, corpus_file.parent / "local-cache", num_shards=3, compress=False
    )
    assert (ds.tokens() == local.tokens()).all() and ds.num_tokens == local.num_tokens
    assert main(["info", uri]) == 0


@pytest.mark.slow
def test_finetune_on_s3_resumes_by_rerun_with_frozen_layers(s3, ray_local, tiny_model_dir, corpus_file, tmp_path):
    """One worker, S3 cache to S3 output: a rerun with more steps resumes; frozen layers stay put; the model on S3 is
    replaced whole and its readers see the new one; a finished rerun starts no worker; changed options are refused."""
    from safetensors.torch import load_file

    from aitextgen_batch.data import TokenDataset
    from aitextgen_batch.errors import UserError
    from aitextgen_batch.generation import Engine, SamplingParams
    from aitextgen_batch.storage import local_copy
    from aitextgen_batch.train import finetune

    cache = "s3://bkt/caches/ft"
    TokenDataset.build([corpus_file], tiny_model_dir, tmp_path / "ft-local", num_shards=2)
    upload_folder(tmp_path / "ft-local", cache, last=("index.json",))
    out = "s3://bkt/finetuned/run1"
    opts = dict(model=str(tiny_model_dir), dataset=cache, output=out, num_workers=1, threads=1, quiet=True)
    opts.update(batch_size=4, block_size=32, learning_rate=3e-3, save_every=5, generate_every=0)
    opts.update(gradient_accumulation=2, freeze_embeddings=True, freeze_layers=1, gradient_checkpointing=True)

    first = finetune(max_steps=10, **opts)
    assert first["status"] == "complete" and first["step"] == 10 and first["resumed_from"] == [0]
    assert first["output"] == out
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.csv"} <= set(Location(out).list())
    eng = Engine.from_pretrained(out, device="cpu")  # a model folder on S3 loads (downloaded once)
    assert eng.generate(["the fox"], [1], SamplingParams(max_new_tokens=4), 1)[0].finish_reason != "error"
    at_10 = load_file(str(local_copy(out, "model") / "model.safetensors"))

    again = finetune(max_steps=20, **opts)
    assert again["status"] == "complete" and again["step"] == 20 and again["resumed_from"] == [10]
    rows = Location(out).read_text("metrics.csv").splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 21))
    assert "samples.jsonl" not in Location(out).list()
    assert 5 < float(rows[0].split(",")[2]) < 7  # step_loss ~ ln(400): the mean of the micro-batches, not of halves
    before, at_20 = (
        load_file(str(tiny_model_dir / "model.safetensors")),
        load_file(str(local_copy(out, "model") / "model.safetensors")),
    )
    frozen = [k for k in before if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0."))]
    assert frozen and all(before[k].equal(at_20[k]) for k in frozen)  # layer 0 included
    trained = "transformer.h.1.mlp.c_fc.weight"
    assert not before[trained].equal(at_20[trained]) and not at_10[trained].equal(at_20[trained])  # not a stale copy
    # finished: a rerun has nothing to train and starts no worker; changed run options are refused
    assert finetune(max_steps=20, **opts)["step"] == 20
    with pytest.raises(UserError, match=r"other options \(batch_size: 4 -> 2\)"):
        finetune(max_steps=30, **{**opts, "batch_size": 2})
    with pytest.raises(UserError, match="already trained to step 20"):
        finetune(max_steps=15, **opts)
