"""Dataset synthesis: chat messages, per-row sampling params, log-probabilities and JSONL input, end to end.

One Ray job (`synth`) carries every feature at once; what needs no cluster runs shard by shard in this process
through `shard.run_shards` (`run_here`), which writes the same files a Ray job does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aitextgen_batch.batch.api import (
    GenerateConfig,
    _build_job,
    check_job,
    generate_dataset,
)
from aitextgen_batch.batch.executor.state import prepare_output
from aitextgen_batch.batch.manifest import JobSpec, Numerics
from aitextgen_batch.batch.shard import ShardFailure, run_shards
from aitextgen_batch.batch.verify import replay_row, verify_output
from aitextgen_batch.cli import main
from aitextgen_batch.config import build_config
from aitextgen_batch.errors import UserError
from aitextgen_batch.storage import Location
from tests.conftest import WORDS
from tests.test_chat import TEMPLATE

BASE_SAMPLING = {"max_new_tokens": 6, "temperature": 1.0, "top_k": 0}
BASE = {**BASE_SAMPLING, "quiet": True}
SYSTEM = "Be brief."
# Per-row params, by row: None keeps the job's.
VARIANTS = [
    None,
    {"temperature": 0.5, "max_new_tokens": 4},
    {"temperature": 1.3, "max_new_tokens": 9, "num_return_sequences": 2},
    {"temperature": 0.5, "max_new_tokens": 9},
    {"temperature": 1.3, "max_new_tokens": 4, "top_k": 20},
]
GOOD_ROWS = 30
BAD_ROWS = {  # id -> (messages, params, the error row's message)
    "bad-role": ([{"role": "wizard", "content": "hi"}], None, "message 0 has role 'wizard'"),
    "bad-content": ([{"role": "user", "content": None}], None, "message 0 (user) content must be a string"),
    "bad-empty": ([], None, "messages is an empty list"),
    "bad-temp": (
        [{"role": "user", "content": "the fox"}],
        {"temperature": -1.0},
        "--params-column 'params': temperature (--temperature) must be >= 0.0, got -1.0",
    ),
    "bad-max": (
        [{"role": "user", "content": "the fox"}],
        {"max_new_tokens": 0},
        "--params-column 'params': max_new_tokens (--max-new-tokens) must be >= 1, got 0",
    ),
}


def conversation(i: int) -> list[dict]:
    words = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(2 + i % 6))
    if i % 3 == 1:
        return [{"role": "system", "content": "Talk like a fox."}, {"role": "user", "content": words}]
    if i % 3 == 2:
        return [
            {"role": "user", "content": "the dog"},
            {"role": "assistant", "content": "jumps"},
            {"role": "user", "content": words},
        ]
    return [{"role": "user", "content": words}]


def variant(i: int) -> dict | None:
    return VARIANTS[(i // 2) % len(VARIANTS)]


def synth_rows() -> list[dict]:
    rows = [
        {"id": f"row-{i:03d}", "messages": conversation(i), "params": variant(i), "topic": WORDS[i % len(WORDS)]}
        for i in range(GOOD_ROWS)
    ]
    rows += [{"id": k, "messages": m, "params": p, "topic": "bad"} for k, (m, p, _) in BAD_ROWS.items()]
    return rows


MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def write_parquet(path: Path, rows: list[dict], params: bool = True) -> Path:
    table = pa.table({"id": [r["id"] for r in rows], "messages": pa.array([r["messages"] for r in rows], MESSAGES)})
    if params:
        table = table.append_column("params", pa.array([r["params"] for r in rows]))
    table = table.append_column("topic", pa.array([r["topic"] for r in rows]))
    pq.write_table(table, path)
    return path


def chat_flags(template_file: Path) -> dict:
    return {
        "messages_column": "messages",
        "system_prompt": SYSTEM,
        "chat_template": str(template_file),
        "logprobs": True,
        "return_tokens": True,
        "keep_columns": ["topic"],
    }


@pytest.fixture(scope="module")
def template_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def synth_input(tmp_path_factory) -> Path:
    return write_parquet(tmp_path_factory.mktemp("synth-in") / "chats.parquet", synth_rows())


def run_synth(out: Path, model: Path, inp: Path, template_file: Path, **layout):
    """The Ray job with every feature (chat messages, a system prompt, per-row params, logprobs and tokens)."""
    s = generate_dataset(
        input=str(inp),
        output=str(out),
        model=str(model),
        params_column="params",
        **layout,
        **chat_flags(template_file),
        **BASE,
    )
    assert s.status == "complete" and s.error_rows == len(BAD_ROWS)
    return s


@pytest.fixture(scope="module")
def synth(ray_local, tiny_model_dir, synth_input, template_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "out"
    run_synth(out, tiny_model_dir, synth_input, template_file, num_actors=2, shard_rows=16, batch_size=16)
    return out


def cpu_engine(model: str):
    """The engine a CPU job of `model` runs (same model, dtype and shapes)."""
    cfg = build_config(GenerateConfig, {"input": "x", "output": "y", "model": model})
    return cfg.engine.resolved("cpu").build()


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return cpu_engine(str(tiny_model_dir))


def run_here(engine, **options) -> Path:
    """A job run in this process, shard by shard through `run_shards`: the files a Ray job writes, without Ray."""
    cfg = build_config(GenerateConfig, {**BASE, "model": engine.source, **options})
    checked = check_job(cfg)
    try:
        job = _build_job(cfg, checked, Numerics.of(cfg.engine.resolved("cpu")))
        assert job.identity.model_fingerprint == engine.fingerprint
        pending, _, _ = prepare_output(job, Location(job.output), time.time(), checked.inputs.staged)
        for shard in pending:
            (outcome,) = run_shards(engine, job, [shard], cfg.batch_size)
            assert not isinstance(outcome, ShardFailure), outcome
    finally:
        checked.cleanup()
    return Path(cfg.output)


def read(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out)
    assert not df.duplicated(["id", "sample_index"]).any()
    return df.set_index(["id", "sample_index"]).sort_index()


def test_chat_rows_are_rendered_with_the_template_and_system_prompt(synth, tokenizer_dir):
    from aitextgen_batch.models.loading import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    df = read(synth)
    for i in range(GOOD_ROWS):
        messages = conversation(i)
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": SYSTEM}, *messages]
        want = tok.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
        row = df.loc[(f"row-{i:03d}", 0)]
        assert row.prompt == want and row.num_prompt_tokens == len(tok(want, add_special_tokens=False).input_ids)
    assert df.loc[("row-001", 0)].prompt.startswith("<|system|>Talk like a fox.\n<|user|>")  # the row's own system
    assert df.loc[("row-000", 0)].prompt.startswith(f"<|system|>{SYSTEM}\n<|user|>")
    job = json.loads((synth / "_job.json").read_text())
    chat = job["identity"]["chat"]
    assert chat == {
        "mode": "messages",
        "template_sha256": hashlib.sha256(TEMPLATE.encode()).hexdigest(),
        "system_prompt": SYSTEM,
    }
    assert job["chat_template"] == TEMPLATE and job["identity"]["columns"]["params"] == "params"
    # a manifest written before these fields existed still loads, with defaults that mean "none of them"
    for key in ("chat", "logprobs", "return_tokens"):
        del job["identity"][key]
    for key in ("messages", "params"):
        del job["identity"]["columns"][key]
    del job["chat_template"]
    for f in job["files"]:
        del f["staged"]
    old = JobSpec.from_json(job)
    assert old.identity.chat is None and not old.identity.logprobs and old.files[0].parquet == old.files[0].path


def test_per_row_params_and_bad_rows(synth):
    df = read(synth)
    for i in range(GOOD_ROWS):
        v = variant(i) or {}
        k = v.get("num_return_sequences", 1)
        rows = df.loc[f"row-{i:03d}"]
        assert list(rows.index) == list(range(k)) and (rows.finish_reason != "error").all()
        params = json.loads(rows.params.iloc[0])
        assert params == {**params, **{"max_new_tokens": 6, "temperature": 1.0, "top_k": 0, **v}}
        assert (rows.num_generated_tokens <= params["max_new_tokens"]).all()
    for key, (_, _, error) in BAD_ROWS.items():
        row = df.loc[(key, 0)]
        assert row.finish_reason == "error" and error in row.error and row.text == ""
        assert pd.isna(row.cumulative_logprob) and row.token_ids is None and row.token_logprobs is None
    assert pd.isna(df.loc[("bad-temp", 0)].params) and json.loads(df.loc[("bad-role", 0)].params)["top_k"] == 0
    assert pd.isna(df.loc[("bad-role", 0)].prompt) and df.loc[("bad-temp", 0)].prompt.endswith("<|assistant|>")
    # a job with per-row params has the top and prompt log-probability columns: any row may ask for them
    tail = ["params", "cumulative_logprob", "token_ids", "token_logprobs", "top_logprobs", "prompt_logprobs", "topic"]
    assert list(df.columns[-7:]) == tail and df.top_logprobs.isna().all() and df.prompt_logprobs.isna().all()


def test_logprobs_equal_a_full_forward_recomputation(synth, engine):
    import torch

    df = read(synth)
    df = df[df.finish_reason != "error"]
    assert set(df.finish_reason) >= {"eos", "length"} or set(df.finish_reason) == {"length"}
    for row in df.iloc[::3].itertuples():
        generated = list(row.token_ids)
        assert len(generated) == len(row.token_logprobs) == row.num_generated_tokens
        assert (generated[-1] == engine.eos_id) == (row.finish_reason == "eos")
        ids = engine.tokenizer(row.prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids + generated])).logits[0, len(ids) - 1 : -1].double()
        want = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(generated)[:, None])[:, 0]
        assert np.allclose(row.token_logprobs, want.numpy(), atol=1e-5)
        assert abs(row.cumulative_logprob - float(want.sum())) < 1e-5 and row.cumulative_logprob < 0


def test_mixed_params_job_equals_single_params_jobs(synth, engine, template_file, tmp_path):
    """The rows of each variant, run as a job of their own with that variant's flags, give the same bytes."""
    mixed = read(synth)
    rows = synth_rows()[:GOOD_ROWS]
    for n, v in enumerate(VARIANTS):
        subset = [r for i, r in enumerate(rows) if variant(i) == v]
        inp = write_parquet(tmp_path / f"v{n}.parquet", subset, params=False)
        out = run_here(
            engine, input=str(inp), output=str(tmp_path / f"out{n}"), **chat_flags(template_file), **(v or {})
        )
        alone = read(out)
        assert len(alone) == sum((v or {}).get("num_return_sequences", 1) for _ in subset)
        cols = ["prompt", "seed", "text", "finish_reason", "num_prompt_tokens", "cumulative_logprob"]
        pd.testing.assert_frame_equal(alone[cols], mixed.loc[alone.index, cols])
        for name in ("token_ids", "token_logprobs"):
            assert [list(x) for x in alone[name]] == [list(x) for x in mixed.loc[alone.index, name]]


def test_rows_replay_alone_and_verify_passes(synth):
    for item, k in [("row-000", 0), ("row-004", 1), ("row-007", 0)]:  # no params, a second sample, T=0.5/4 tokens
        row, res, match = replay_row(synth, item, k)
        assert match and res.text == row["text"] and res.cumulative_logprob == row["cumulative_logprob"]
    assert main(["replay", "--output", str(synth), "--id", "row-005", "--sample-index", "1"]) == 0
    rows = GOOD_ROWS + len(BAD_ROWS) + sum(1 for i in range(GOOD_ROWS) if variant(i) is VARIANTS[2])
    report = verify_output(synth, sample=rows)
    assert (report["rows"], report["expected_rows"], report["checked"]) == (rows, rows, rows - len(BAD_ROWS))
    assert not (report["mismatches"] or report["duplicates"] or report["missing"] or report["unexpected"])


def test_verify_fails_on_tampered_logprobs_and_missing_samples(synth, tmp_path):
    out = tmp_path / "tampered"
    shutil.copytree(synth, out)
    job = json.loads((out / "_job.json").read_text())
    job["output"] = str(out)
    (out / "_job.json").write_text(json.dumps(job))

    def rewrite(shard: int, change) -> None:
        part = out / f"part-{shard:05d}.parquet"
        table = change(pq.read_table(part))
        pq.write_table(table, part)
        record = json.loads((out / "_done" / f"{shard:05d}.json").read_text())
        blob = part.read_bytes()
        record.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest(), rows_out=table.num_rows)
        (out / "_done" / f"{shard:05d}.json").write_text(json.dumps(record))

    def nudge(t):
        values = t.column("cumulative_logprob").to_pylist()
        values[0] += 1e-9
        return t.set_column(t.schema.get_field_index("cumulative_logprob"), "cumulative_logprob", pa.array(values))

    rewrite(0, nudge)
    report = verify_output(out, sample=1000)
    assert report["mismatches"] == 1 and report["missing"] == 0
    # a second sample of a two-sample row dropped: missing, though every id is there
    rewrite(1, lambda t: t.filter(pa.compute.not_equal(t.column("sample_index"), 1)))
    report = verify_output(out, sample=1)
    assert report["missing"] >= 1 and report["rows"] == report["expected_rows"] - report["missing"]


def test_same_rows_across_actor_counts_shards_and_batch_sizes(
    synth, tiny_model_dir, synth_input, template_file, tmp_path
):
    out = tmp_path / "out"
    s = run_synth(out, tiny_model_dir, synth_input, template_file, num_actors=1, shard_rows=20, batch_size=3)
    assert s.shards == 2 and s.actors == 1
    a, b = read(synth), read(out)
    pd.testing.assert_frame_equal(
        a.drop(columns=["token_ids", "token_logprobs"]), b.drop(columns=["token_ids", "token_logprobs"])
    )
    assert [list(x) for x in a.token_logprobs.dropna()] == [list(x) for x in b.token_logprobs.dropna()]


def test_cpu_rows_replay_with_the_thread_count_that_made_them(tmp_path, monkeypatch):
    """On a CPU a matmul may split its sums by thread count (the previous engine's eager attention did: pydoc-gpt2's
    logprobs differed between 1 and 2 threads), so the count is part of the numerics: each shard records it, and
    replay and verify re-generate with it, whatever the calling process uses."""
    import torch

    from aitextgen_batch.generation import Engine

    engine = cpu_engine("pydoc-gpt2")
    inp = tmp_path / "p.jsonl"
    write_jsonl(inp, [{"prompt": f"The {w} is"} for w in WORDS[:6]])
    before = torch.get_num_threads()
    seen: list[int] = []
    generate = Engine.generate

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return generate(self, *args, **kwargs)

    try:
        torch.set_num_threads(1)
        out = run_here(engine, input=str(inp), output=str(tmp_path / "out"), logprobs=True, model="pydoc-gpt2")
        torch.set_num_threads(2)
        assert json.loads((out / "_done" / "00000.json").read_text())["threads"] == 1
        monkeypatch.setattr(Engine, "generate", spy)
        report = verify_output(out, sample=6)
        assert (report["checked"], report["mismatches"]) == (6, 0)
        row, res, match = replay_row(out, "p.jsonl:2")
        assert match and res.cumulative_logprob == row["cumulative_logprob"] and torch.get_num_threads() == 2
        assert seen and set(seen) == {1}  # every re-generation ran at the recorded count, then 2 was restored
    finally:
        torch.set_num_threads(before)


def test_chat_job_identity_changes_are_refused(synth, tiny_model_dir, synth_input, template_file, tmp_path):
    flags = {**chat_flags(template_file), **BASE, "params_column": "params", "shard_rows": 16}
    common = {"input": str(synth_input), "output": str(synth), "model": str(tiny_model_dir)}
    with pytest.raises(UserError, match=r"holds a job made with a different chat .*'system_prompt': 'Be brief.'"):
        generate_dataset(**common, **{**flags, "system_prompt": "Be long."})
    other = tmp_path / "other.jinja"
    other.write_text(TEMPLATE.replace("<|assistant|>", "<|bot|>"))
    with pytest.raises(UserError, match=r"different chat .*template_sha256.*--overwrite"):
        generate_dataset(**common, **{**flags, "chat_template": str(other)})


def test_chat_without_a_template_is_refused_before_ray(tiny_model_dir, synth_input, tmp_path):
    out = tmp_path / "out"
    opts = {"input": str(synth_input), "output": str(out), "model": str(tiny_model_dir), **BASE}
    for kind in ({"messages_column": "messages"}, {"chat": True, "prompt_column": "id"}):
        with pytest.raises(UserError, match=r"tokenizer has no chat template.*pass --chat-template FILE"):
            check_job(build_config(GenerateConfig, {**opts, **kind}))  # what runs before Ray is joined
        with pytest.raises(UserError, match=r"tokenizer has no chat template"):
            generate_dataset(**opts, **kind)
    assert not out.exists()
    with pytest.raises(UserError, match=r"system_prompt \(--system-prompt\) is for chat input: add --chat"):
        build_config(GenerateConfig, {**opts, "system_prompt": "x"})
    with pytest.raises(UserError, match=r"chat \(--chat\) and --messages-column both"):
        build_config(GenerateConfig, {**opts, "chat": True, "messages_column": "messages"})
    # a params struct with a field that is not a sampling field would fail every row: refused up front
    pq.write_table(pa.table({"prompt": ["a"], "p": [{"temprature": 1.0}]}), tmp_path / "p.parquet")
    with pytest.raises(
        UserError, match=r"p.parquet: the params column 'p' \(--params-column\) has field\(s\) \['temprature'\]"
    ):
        generate_dataset(**{**opts, "input": str(tmp_path / "p.parquet")}, params_column="p")


def write_jsonl(path: Path, objects: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects))
    return path


def test_jsonl_input_gives_the_parquet_output(engine, template_file, tmp_path):
    rows = synth_rows()[:12] + synth_rows()[-2:]
    objects = [{k: v for k, v in r.items() if not (k == "params" and v is None)} for r in rows]
    objects[3]["params"] = json.dumps(objects[3]["params"])  # JSON text of an object works too
    inp = tmp_path / "in"
    inp.mkdir()
    write_jsonl(inp / "chats.jsonl", objects[:9] + [""] + objects[9:])  # a blank line is skipped
    flags = {**chat_flags(template_file), "params_column": "params", "shard_rows": 5}
    a = run_here(engine, input=str(inp), output=str(tmp_path / "a"), **flags)
    b = run_here(
        engine, input=str(write_parquet(tmp_path / "chats.parquet", rows)), output=str(tmp_path / "b"), **flags
    )
    pd.testing.assert_frame_equal(read(a), read(b))
    job = json.loads((a / "_job.json").read_text())
    size, sha256 = (inp / "chats.jsonl").stat().st_size, hashlib.sha256((inp / "chats.jsonl").read_bytes()).hexdigest()
    assert job["files"][0]["staged"] == str(a / "_inputs" / "00000.parquet") and job["identity"]["inputs"] == [
        ["chats.jsonl", 14, size, sha256]  # the original file's contents identify the job's input
    ]
    assert pq.read_table(a / "_inputs" / "00000.parquet").num_rows == 14
    # --chat: the prompt key is one user message; ids derive from the file name and row; JSON params with a field
    # that is not a sampling field, or not an object, make error rows naming what is wrong
    plain = tmp_path / "plain.jsonl"
    chat = {"input": str(plain), "chat": True, "chat_template": str(template_file), "params_column": "params"}
    write_jsonl(plain, [{"prompt": "the quick fox"}, {"prompt": "seven wizards"}, {"prompt": 7}])
    with pytest.raises(UserError, match=r"plain.jsonl line 3: 'prompt' \(--prompt-column\) must be a string, got 7"):
        run_here(engine, output=str(tmp_path / "c"), **chat)
    assert not (tmp_path / "c").exists()
    lines = [{"prompt": "the quick fox", "params": {"temperature": 0.3}}, {"prompt": "seven wizards"}]
    lines += [{"prompt": "a dog", "params": {"temprature": 0.3}}, {"prompt": "a dog", "params": "[1]"}]
    write_jsonl(plain, lines)
    c = run_here(engine, output=str(tmp_path / "c"), **chat)
    df = read(c)
    assert list(df.index.get_level_values(0)) == [f"plain.jsonl:{i}" for i in range(4)]
    assert df.prompt.iloc[1] == "<|user|>seven wizards\n<|assistant|>"
    assert list(df.finish_reason != "error") == [True, True, False, False]
    assert df.error.iloc[2].startswith("--params-column 'params': unknown sampling field(s) 'temprature'; the fields")
    assert df.error.iloc[3] == "--params-column 'params' must hold an object of sampling fields, got list"
    row, res, match = replay_row(c, "plain.jsonl:0")
    assert match and res.text == row["text"] and json.loads(row["params"])["temperature"] == 0.3


def test_bad_jsonl_lines_are_named_before_anything_is_written(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    ok = {"id": "a", "prompt": "the fox", "n": 1}

    def refuse(objects: list, match: str, **kw):
        inp = write_jsonl(tmp_path / "bad.jsonl", objects)
        with pytest.raises(UserError, match=match):
            generate_dataset(input=str(inp), output=str(out), model=str(tiny_model_dir), **{**BASE, **kw})
        assert not out.exists()

    refuse([ok, ok, "{not json"], r"bad.jsonl line 3: not valid JSON \(Expecting property name")
    refuse([ok, [1, 2]], r"bad.jsonl line 2: must be a JSON object \{\.\.\.\}, got a JSON array")
    refuse([ok, {"id": "b", "prompt": ["x"]}], r"line 2: 'prompt' \(--prompt-column\) must be a string, got \[\"x\"\]")
    refuse([ok, {"id": 2, "prompt": "x"}], r"line 2: 'id' \(--id-column\) is a int but earlier lines have string ids")
    refuse([ok, {"prompt": "x"}], r"bad.jsonl line 2: no 'id' \(--id-column\) while other lines have one")
    refuse(
        [ok, {"id": "b", "prompt": "x", "s": "7"}], r"line 2: 's' \(--seed-column\) must be an integer", seed_column="s"
    )
    refuse(
        [ok, {"id": "b", "prompt": "x", "n": "one"}],
        r"line 2: 'n' \(--keep-columns\) does not fit the type of earlier lines \(int64\)",
        keep_columns=["n"],
    )
    refuse([{"id": "a", "text": "x"}], r"bad.jsonl: no line has the key 'prompt' \(--prompt-column\)")
    refuse([ok, {"id": "a", "prompt": "y"}], r"duplicate id 'a': .*bad.jsonl row 0 and .*bad.jsonl row 1")
    (tmp_path / "bad.jsonl").write_bytes(b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "\xff"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 2: not valid UTF-8"):
        generate_dataset(input=str(tmp_path / "bad.jsonl"), output=str(out), model=str(tiny_model_dir), **BASE)


# A template that raises on some conversations (not a TemplateError): a bug of the template's, met by one row.
FRAGILE_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] == 'boom' %}{{ 1 // 0 }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "ray"])
def test_one_rows_failure_is_that_rows_error_row_on_ray_and_in_process(
    tiny_model_dir, tmp_path, tmp_path_factory, ray_local, in_process
):
    template = tmp_path / "fragile.jinja"
    template.write_text(FRAGILE_TEMPLATE)
    inp = tmp_path / "rows.jsonl"
    write_jsonl(
        inp,
        [
            {"id": "ok-1", "messages": [{"role": "user", "content": "the fox"}]},
            {"id": "huge-k", "messages": [{"role": "user", "content": "a dog"}], "params": {"top_k": 10**21}},
            {"id": "boom", "messages": [{"role": "user", "content": "boom"}]},
            {
                "id": "many",
                "messages": [{"role": "user", "content": "a dog"}],
                "params": {"num_return_sequences": 10**8},
            },
            {"id": "ok-2", "messages": [{"role": "user", "content": "old river"}], "params": {"top_k": 5}},
        ],
    )
    out = tmp_path / "out"
    s = generate_dataset(
        input=str(inp),
        output=str(out),
        model=str(tiny_model_dir),
        messages_column="messages",
        params_column="params",
        chat_template=str(template),
        shard_rows=8,
        num_actors=1,
        in_process=in_process,
        **BASE,
    )
    assert (s.status, s.shards_done, s.shards_failed, s.retries, s.rows, s.error_rows) == ("complete", 1, 0, 0, 5, 3)
    df = read(out)
    assert list(df.finish_reason[["ok-1", "ok-2"]]) != ["error", "error"] and df.error[["ok-1", "ok-2"]].isna().all()
    assert df.loc[("huge-k", 0)].error == (
        "--params-column 'params': top_k (--top-k) must be <= 16,777,216 (a top_k beyond the vocabulary keeps every "
        "token), got 1000000000000000000000"
    )
    assert df.loc[("boom", 0)].error == (
        "the chat template failed on this row's messages (ZeroDivisionError: integer division or modulo by zero)"
    )
    assert "num_return_sequences (--num-return-sequences) must be <= 1,024, got 100000000" in df.loc[("many", 0)].error
    # the two runners give the same bytes
    other = tmp_path_factory.mktemp("ray-or-not") / "out"
    generate_dataset(
        input=str(inp),
        output=str(other),
        model=str(tiny_model_dir),
        messages_column="messages",
        params_column="params",
        chat_template=str(template),
        shard_rows=8,
        in_process=True,
        **BASE,
    )
    pd.testing.assert_frame_equal(df, read(other))


def test_a_refused_or_failed_job_never_blocks_the_corrected_rerun(tiny_model_dir, tmp_path, capsys):
    inp = tmp_path / "p.jsonl"
    write_jsonl(inp, [{"id": w, "prompt": f"the {w}"} for w in WORDS[:4]])
    job = {"input": str(inp), "output": str(tmp_path / "out"), "model": str(tiny_model_dir), "in_process": True}
    # a flag beyond its bound is refused before anything is written, with the flag named
    with pytest.raises(UserError, match=r"top_k \(--top-k\) must be <= 16,777,216 .*got 1000000000000000000000"):
        generate_dataset(**job, **{**BASE, "top_k": 10**21})
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["generate", "--input", str(inp), "--output", str(tmp_path / "out"), "--top-k", str(10**21)])
    assert "top_k (--top-k) must be <= 16,777,216" in capsys.readouterr().err
    # a job that finished no shard (stopped or failed before its first) leaves nothing that refuses the corrected
    # rerun, made with other flags
    out = tmp_path / "out"
    assert generate_dataset(**job, **BASE).status == "complete"
    (out / "_done" / "00000.json").unlink()
    (out / "part-00000.parquet").unlink()
    s = generate_dataset(**job, **{**BASE, "temperature": 0.5})
    assert s.status == "complete" and s.shards_done == 1 and len(pd.read_parquet(out)) == 4
    assert json.loads((out / "_job.json").read_text())["identity"]["sampling"]["temperature"] == 0.5


def test_invalid_unicode_is_an_error_row_in_generated_rows_and_a_named_refusal_elsewhere(
    tiny_model_dir, tmp_path, template_file, capsys
):
    def jsonl(name: str, lines: list[str]) -> Path:
        path = tmp_path / name
        path.write_text("".join(line + "\n" for line in lines))  # JSON text with `\ud83d` escapes, as written
        return path

    inp = jsonl(
        "p.jsonl",
        [
            '{"id": "a", "prompt": "the fox"}',
            '{"id": "b", "prompt": "Broken emoji \\ud83d here"}',
            '{"id": "c", "prompt": "the dog", "params": {"stop": ["\\ud83d"]}}',
            '{"id": "d", "prompt": "a dog", "params": "{\\"prefix\\": \\"x\\\\udc00\\"}"}',
        ],
    )
    out = tmp_path / "out"
    s = generate_dataset(
        input=str(inp), output=str(out), model=str(tiny_model_dir), params_column="params", in_process=True, **BASE
    )
    assert (s.status, s.rows, s.error_rows) == ("complete", 4, 3)
    df = read(out)
    assert pd.isna(df.loc[("a", 0)].error)
    assert df.loc[("b", 0)].error.startswith("prompt is not valid UTF-8") and pd.isna(df.loc[("b", 0)].prompt)
    assert "stop (--stop) must be valid Unicode text (it holds a lone surrogate '\\ud83d'" in df.loc[("c", 0)].error
    assert "prefix (--prefix) must be valid Unicode text" in df.loc[("d", 0)].error
    # the same bytes in a Parquet file give the same error row
    raw = pa.array([b"Broken emoji \xed\xa0\xbd here"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ["b"], "prompt": raw}), tmp_path / "p.parquet")
    generate_dataset(
        input=str(tmp_path / "p.parquet"),
        output=str(tmp_path / "pq"),
        model=str(tiny_model_dir),
        in_process=True,
        **BASE,
    )
    assert read(tmp_path / "pq").loc[("b", 0)].error.split(" in ")[0] == df.loc[("b", 0)].error.split(" in ")[0]
    # a conversation holding one is that row's error
    chats = jsonl("m.jsonl", ['{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', '{"messages": "[]"}'])
    generate_dataset(
        input=str(chats),
        output=str(tmp_path / "m"),
        model=str(tiny_model_dir),
        messages_column="messages",
        chat_template=str(template_file),
        in_process=True,
        **BASE,
    )
    errors = list(read(tmp_path / "m").error)
    assert errors[0] == "message 0 (user) content is not valid Unicode (a lone surrogate '\\ud83d' at character 3)"
    # outside the generated text (an id, a kept column, a flag) it is refused, named with its line or flag
    for line, keep, where in (
        ('{"id": "x\\ud83d", "prompt": "p"}', [], r"line 1: 'id' \(--id-column\) is not valid Unicode"),
        ('{"prompt": "p", "topic": ["\\udc80"]}', ["topic"], r"line 1: 'topic' \(--keep-columns\) is not valid"),
    ):
        bad = jsonl("bad.jsonl", [line])
        with pytest.raises(UserError, match=where):
            generate_dataset(
                input=str(bad),
                output=str(tmp_path / "x"),
                model=str(tiny_model_dir),
                keep_columns=keep,
                in_process=True,
                **BASE,
            )
    assert not (tmp_path / "x").exists()
    capsys.readouterr()
    for argv in (["replay", "--prompt", "Broken \ud83d", "--seed", "1"], ["generate", "--input", "\udcff.jsonl"]):
        with pytest.raises(SystemExit):
            main([*argv, "--model", str(tiny_model_dir)])
        assert "must be valid Unicode text (it holds a lone surrogate" in capsys.readouterr().err
