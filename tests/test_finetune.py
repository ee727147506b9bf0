"""Finetuning on real Ray Train with real Lightning DDP (gloo, CPU workers), on the tiny model from conftest.

The 2-worker run is made once (module fixture) and serves as the uninterrupted reference of the killed run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from aitextgen_batch.errors import UserError

REPETITIVE = ["the quick brown fox jumps over the lazy dog."] * 150 + ["seven wizards hex bold zebras."] * 150
RUN = dict(threads=1, batch_size=4, block_size=32, learning_rate=3e-3, quiet=True)
TWO = dict(RUN, num_workers=2, max_steps=120, save_every=40, generate_every=60, num_samples=2, sample_tokens=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model_dir):
    from aitextgen_batch.data import TokenDataset

    out = tmp_path_factory.mktemp("ft") / "cache"
    TokenDataset.from_texts(REPETITIVE, tiny_model_dir, out, num_shards=4)
    return out


@pytest.fixture(scope="module")
def two_worker_run(ray_local, tmp_path_factory, tiny_model_dir, cache):
    from aitextgen_batch.train import finetune

    out = tmp_path_factory.mktemp("ft") / "two"
    return out, finetune(model=str(tiny_model_dir), dataset=cache, output=out, **TWO)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _rows(out):
    import csv

    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _events(out, kind):
    path = out / "events.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.mark.slow
def test_two_workers_loss_falls_and_output_loads(two_worker_run):
    from aitextgen_batch import Engine, SamplingParams, load_model

    out, s = two_worker_run
    assert s["status"] == "complete" and s["step"] == 120 and s["resumed_from"] == [0] and s["workers"] == 2
    assert s["tokens"] == 120 * 2 * 4 * 32 and s["tokens_per_second"] > 0
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 121))
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[0]["step_loss"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [x["step"] for x in samples] == [60, 60, 120, 120] and all(isinstance(x["text"], str) for x in samples)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000080", "step-00000120"]
    assert not list(out.glob("*.tmp*")) and not list((out / "checkpoints").glob(".tmp*"))
    final = _weights(out)
    assert all(final[k].equal(v) for k, v in _weights(out / "checkpoints" / "step-00000120").items())
    model, tok = load_model(str(out), device="cpu")
    assert model.config.n_layer == 2
    res = Engine.from_pretrained(str(out), device="cpu").generate(["the quick"], [1], SamplingParams(max_new_tokens=6))
    assert res[0].error is None and res[0].num_generated_tokens >= 1


def _kill_rank0_after_a_registered_save(out, max_steps: int, timeout: float = 150) -> int:
    """SIGKILL rank 0 once Ray Train has registered a save before the last step; returns that save's step."""
    snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if not (out / "events.jsonl").is_file() or not snapshot.is_file():
            continue
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except json.JSONDecodeError:  # being rewritten
            continue
        step = int(latest["checkpoint_dir_name"].removeprefix("step-")) if latest else 0
        if 0 < step < max_steps:
            try:
                os.kill(_events(out, "start")[-1]["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pytest.fail("the run finished before a worker could be killed: raise max_steps")
            return step
    raise AssertionError("no save was registered in time")


@pytest.mark.slow
def test_killed_worker_resumes_from_last_save(two_worker_run, tmp_path, tiny_model_dir, cache, monkeypatch):
    from aitextgen_batch.train import finetune

    out = tmp_path / "killed"
    result = {}
    run = threading.Thread(
        target=lambda: result.update(finetune(model=str(tiny_model_dir), dataset=cache, output=out, **TWO))
    )
    run.start()
    registered = _kill_rank0_after_a_registered_save(out, TWO["max_steps"])
    run.join(timeout=240)
    assert result["status"] == "complete" and result["step"] == 120, result
    first, resumed = result["resumed_from"]
    saves = [e["step"] for e in _events(out, "save")]
    assert first == 0 and resumed >= registered > 0 and resumed % 40 == 0 and resumed in saves
    assert result["worker_restarts"] == 1
    assert [int(r["step"]) for r in _rows(out)] == list(range(1, 121))  # the redone steps are logged once
    # data order, dropout, optimizer and schedule resume exactly: the result equals the uninterrupted run's
    reference = _weights(two_worker_run[0])
    assert all(reference[k].equal(v) for k, v in _weights(out).items())


def test_errors_before_any_worker_starts(tmp_path, tiny_model_dir, cache, corpus_file):
    from aitextgen_batch.data import TokenDataset
    from aitextgen_batch.tokenizer import train_tokenizer
    from aitextgen_batch.train import FinetuneConfig, finetune

    base = dict(model=str(tiny_model_dir), output=tmp_path / "out", **RUN)
    with pytest.raises(UserError, match=r"token cache '.*nowhere' does not exist"):
        finetune(dataset=tmp_path / "nowhere", **base)
    other_tok = train_tokenizer([corpus_file], vocab_size=300, output=tmp_path / "tok300", min_frequency=1)
    other = TokenDataset.from_texts(REPETITIVE, other_tok, tmp_path / "other-cache", num_shards=2)
    with pytest.raises(UserError, match=rf"built with tokenizer {other.fingerprint}, but the model's tokenizer is "):
        finetune(dataset=other.path, **base)
    with pytest.raises(UserError, match="has 4 shards but there are 5 workers"):
        finetune(dataset=cache, **{**base, "num_workers": 5})
    with pytest.raises(UserError, match=r"precision \(--precision\) bf16-mixed and 16-mixed need --use-gpu"):
        FinetuneConfig(model="m", dataset=cache, output=tmp_path, precision="bf16-mixed")
    with pytest.raises(UserError, match=r"block_size \(--block-size\) must be <= 256"):
        finetune(dataset=cache, **{**base, "block_size": 512})
    with pytest.raises(UserError, match=r"freeze_layers \(--freeze-layers\) must be <= 2"):
        finetune(dataset=cache, **{**base, "freeze_layers": 3})
    # no --model: the default model (SmolLM2), whose tokenizer is not the one this cache was built with
    with pytest.raises(UserError, match="built with tokenizer .* but the model's tokenizer is"):
        finetune(dataset=cache, output=tmp_path / "o", **RUN)
    with pytest.raises(UserError, match="holds something other than a finetune run"):
        finetune(dataset=cache, **{**base, "output": tiny_model_dir})
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match=r"--output .*a-file is a file, not a folder"):
        finetune(dataset=cache, **{**base, "output": tmp_path / "a-file"})
    assert not (tmp_path / "out").exists()


def test_a_non_finite_learning_rate_is_refused_before_any_worker_starts(tmp_path, tiny_model_dir, cache):
    """NaN used to kill the workers three times, and the output folder then refused the corrected rerun."""
    from aitextgen_batch.train import finetune

    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(UserError, match=r"learning_rate \(--learning-rate\) must be a finite number"):
            finetune(model=str(tiny_model_dir), dataset=cache, output=tmp_path / "out", **{**RUN, "learning_rate": bad})
    assert not (tmp_path / "out").exists()


def test_a_run_that_failed_before_its_first_save_does_not_block_the_corrected_rerun(tmp_path, tiny_model_dir, cache):
    from aitextgen_batch.train import FinetuneConfig
    from aitextgen_batch.train.api import _check_output, _record, plan

    cfg = FinetuneConfig(model=str(tiny_model_dir), dataset=cache, output=tmp_path / "out", **{**RUN, "threads": 1})
    failed = FinetuneConfig(**{**cfg.__dict__, "learning_rate": 5.0})
    _record(tmp_path / "out", _check_output(failed, plan(failed))[1])  # what a run that died at step 0 leaves
    (tmp_path / "out" / "metrics.csv").write_text("step\n")
    last, doc = _check_output(cfg, plan(cfg))
    assert last == 0 and doc["identity"]["learning_rate"] == RUN["learning_rate"]


def test_finetune_with_a_dead_address_is_an_error_not_a_hang(tmp_path, tiny_model_dir, cache):
    from tests.conftest import free_port

    dead = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "aitextgen_batch", "finetune", "--model", str(tiny_model_dir), "--dataset"]
    argv += [str(cache), "--output", str(tmp_path / "out"), "--address", dead, "--threads", "1", "--quiet"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"no Ray cluster answers at {dead}" in r.stderr and "Traceback" not in r.stderr


def test_the_lightning_flavor_is_the_one_ray_train_uses():
    """Where both `lightning` and `pytorch_lightning` are installed, Ray Train's strategy is `lightning.pytorch`'s,
    and our module, callbacks and Trainer must be of that flavor (else every finetune fails). The suite installs
    `lightning` (test extras), so every finetune test here runs in that world; this test also checks the other."""
    import importlib.util

    from ray.train.lightning import RayDDPStrategy

    from aitextgen_batch.train.flavor import pl
    from aitextgen_batch.train.module import CausalLMModule

    assert importlib.util.find_spec("lightning") is not None, "install the test extras: `lightning` is one"
    assert pl.__name__ == "lightning.pytorch" and issubclass(CausalLMModule, pl.LightningModule)
    assert issubclass(RayDDPStrategy, pl.strategies.Strategy)
    # the world without `lightning`: both sides fall back to pytorch_lightning
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'lightning' or name.startswith('lightning.'): raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from ray.train.lightning import RayDDPStrategy\n"
        "from aitextgen_batch.train.flavor import pl\n"
        "assert pl.__name__ == 'pytorch_lightning' and issubclass(RayDDPStrategy, pl.strategies.Strategy)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_a_damaged_save_is_never_resumed_from(tmp_path, tiny_model_dir):
    from aitextgen_batch.models.loading import load_model
    from aitextgen_batch.train.state import saved_steps, step_problem, write_step

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    root = tmp_path / "checkpoints"
    first, second = (write_step(root, s, model, tok, {"smoothed_loss": 1.0}) for s in (5, 10))
    assert step_problem(second) is None and [s for s, _ in saved_steps(root)] == [5, 10]
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated after it was saved
    assert "model.safetensors differs from the size and sha256" in step_problem(second)
    assert saved_steps(root) == [(5, first)]  # the resume falls back to the last intact save
    (first / "training_state" / "optimizer.safetensors").unlink()
    assert saved_steps(root) == []


def test_training_state_round_trips_without_pickle(tmp_path):
    import torch

    from aitextgen_batch.train.state import read_state, write_state

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    sched.step()
    write_state(tmp_path / "s", {"step": 7, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["optimizer.safetensors", "state.json"]
    (tmp_path / "step" / "training_state").parent.mkdir()
    (tmp_path / "s").rename(tmp_path / "step" / "training_state")
    back = read_state(tmp_path / "step")
    assert back["step"] == 7 and back["scheduler"] == sched.state_dict()
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]  # betas stay a tuple
    for i, st in opt.state_dict()["state"].items():
        assert all(back["optimizer"]["state"][i][k].equal(v) for k, v in st.items())
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])


def test_a_diverging_run_stops_at_that_step_and_never_saves_or_publishes_non_finite_weights(
    ray_local, tmp_path, tiny_model_dir, cache
):
    from safetensors.torch import load_file

    from aitextgen_batch.train import finetune
    from aitextgen_batch.train.state import saved_steps

    out = tmp_path / "out"
    run = dict(RUN, learning_rate=1e30, num_workers=1, max_steps=40, save_every=1, generate_every=1, sample_tokens=4)
    s = finetune(model=str(tiny_model_dir), dataset=cache, output=out, **run)
    assert s["status"] == "failed" and s["error"].startswith("training diverged at step "), s
    step = int(s["error"].split()[4].rstrip(":"))
    assert step < 10 and "--learning-rate 1e+30 may be too high" in s["error"]
    assert "no weights of step" in s["error"] and "finetune --model" in s["error"]
    # training stopped there: nothing was saved at or after the step, every save holds finite weights, nothing was
    # published, and the loss plot was drawn from the finite rows
    saved = saved_steps(out / "checkpoints")
    assert saved and all(s_ < step for s_, _ in saved)
    assert all(t.isfinite().all() for _, p in saved for t in load_file(p / "model.safetensors").values())
    assert not (out / "model.safetensors").exists() and (out / "loss.png").is_file()
    assert [e["step"] for e in _events(out, "diverged")] == [step]


def test_a_model_with_non_finite_weights_is_refused_before_anything_runs(tmp_path, tiny_model_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    from aitextgen_batch.batch.api import generate_dataset
    from aitextgen_batch.models.loading import load_model

    bad = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, bad)
    weights = load_file(bad / "model.safetensors")
    name = sorted(weights)[0]
    weights[name][0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "p.jsonl").write_text('{"prompt": "the fox"}\n')
    with pytest.raises(UserError, match=rf"weight '{name}' holds NaN or infinite values: the model cannot generate"):
        generate_dataset(input=str(tmp_path / "p.jsonl"), output=str(tmp_path / "o"), model=str(bad), in_process=True)
    with pytest.raises(UserError, match="holds NaN or infinite values"):
        load_model(str(bad), device="cpu")
    assert not (tmp_path / "o").exists()


def test_finetune_checks_model_cache_and_weights_before_ray_train_starts(tmp_path, tiny_model_dir, cache):
    import shutil

    import torch
    from safetensors.torch import load_file

    from aitextgen_batch.train import finetune

    base = dict(output=tmp_path / "out", **{**RUN, "max_steps": 1})
    # pickle-only weights: refused at once, without pointing at an --allow-pickle that finetune does not take
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(
        UserError, match=r"has only pickle weights \(pytorch_model.bin\).*save_pretrained\(dir\)\) first"
    ) as e:
        finetune(model=str(pickled), dataset=cache, **base)
    assert "--allow-pickle" not in str(e.value)
    # a truncated weights file
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(UserError, match=r"model.safetensors' is not a readable safetensors file"):
        finetune(model=str(truncated), dataset=cache, **base)
    # a damaged cache shard (same size, other bytes)
    damaged = tmp_path / "cache"
    shutil.copytree(cache, damaged)
    shard = sorted(p for p in damaged.iterdir() if p.name.startswith("shard"))[1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=rf"{shard.name}.*sha256"):
        finetune(model=str(tiny_model_dir), dataset=damaged, **base)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_exits_130_and_leaves_only_whole_saves(ray_address, tmp_path, tiny_model_dir, cache):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "aitextgen_batch", "finetune", "--model", str(tiny_model_dir), "--dataset"]
    argv += [str(cache), "--output", str(out), "--address", ray_address, "--threads", "1", "--quiet"]
    argv += ["--batch-size", "4", "--block-size", "32", "--save-every", "5", "--generate-every", "0"]
    proc = subprocess.Popen(
        [*argv, "--max-steps", "100000"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    deadline = time.time() + 180
    while time.time() < deadline and not _events(out, "save"):
        time.sleep(0.1)
    assert _events(out, "save"), "no save in time"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "finetune: interrupted. Saved steps are kept: rerun the same command to resume from the last one." in err
    # no traceback of ours; Ray's own placement-group cleaner may log one when another Ray runs on the machine
    # ("Found multiple active Ray instances"), which is not this command's output
    ours = [line for line in err.splitlines() if "(PlacementGroupCleaner pid=" not in line]
    assert not any("Traceback" in line for line in ours), err[-2000:]
    # every step folder the interrupted run left is whole (a save cut short stays a hidden temporary folder, which the
    # rerun removes): the rerun resumes from an intact save
    from aitextgen_batch.train.state import saved_steps

    folders = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert folders and folders == [p.name for _, p in saved_steps(out / "checkpoints")]
