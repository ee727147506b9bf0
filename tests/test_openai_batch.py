"""The OpenAI batch format in and out (`run-batch`), top and prompt log-probability columns, and what a job cost.

Every results line is checked with the `openai` package's own types (`ChatCompletion`, `Completion`, `BatchError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai.types import BatchError, Completion
from openai.types.chat import ChatCompletion

from aitextgen_batch.batch.api import generate_dataset
from aitextgen_batch.batch.manifest import RequestSpec
from aitextgen_batch.batch.openai_batch.requests import CHAT, COMPLETIONS, translate
from aitextgen_batch.batch.verify import replay_row, verify_output
from aitextgen_batch.cli import main
from aitextgen_batch.generation.params import SamplingParams
from tests.conftest import WORDS
from tests.test_chat import TEMPLATE

EPOCH = "1767225600"  # SOURCE_DATE_EPOCH: the responses' `created`, so that two jobs write the same bytes
SCHEMA = {
    "type": "object",
    "properties": {"word": {"type": "string"}},
    "required": ["word"],
    "additionalProperties": False,
}
UNSUPPORTED, WRONG_MODEL, JSON_SCHEMA = 20, 30, 10  # the requests that test those


def words(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(n))


def batch_requests() -> list[dict]:
    """50 requests: chat and completions, n > 1, seeds given and not, greedy and sampled, logprobs with top_logprobs,
    a JSON-schema response_format, vLLM's extensions, an unsupported field and a wrong model name."""
    lines = []
    for i in range(50):
        chat = i % 2 == 0
        body: dict = {"model": "tiny-gpt2", "max_tokens": 3 + i % 5}
        if chat:
            body["messages"] = [{"role": "user", "content": words(i, 2 + i % 5)}]
            if i % 6 == 0:
                body["messages"].insert(0, {"role": "developer" if i % 12 else "system", "content": "Be brief."})
            if i % 8 == 4:  # content as text parts, the newer spelling
                body["messages"][-1]["content"] = [{"type": "text", "text": words(i, 3)}]
        else:
            body["prompt"] = words(i, 2 + i % 5)
        if i % 3 == 0:
            body["seed"] = 1000 + i
        if i % 7 == 1:
            body["n"] = 2 + i % 2
        if i % 5 == 2:
            body["temperature"] = 0
        if i % 4 in (1, 2):
            if chat:
                body.update(logprobs=True, top_logprobs=3)
            else:
                body["logprobs"] = 2
        if i % 9 == 4:
            body.update(top_k=-1, top_p=0.9, stop=["zebras"], repetition_penalty=1.1, min_tokens=1, user="u1")
        if i == 44:
            body["max_completion_tokens"] = body.pop("max_tokens")
        lines.append(
            {"custom_id": f"request-{i}", "method": "POST", "url": CHAT if chat else COMPLETIONS, "body": body}
        )
    lines[JSON_SCHEMA]["body"]["max_tokens"] = 24
    lines[JSON_SCHEMA]["body"]["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": SCHEMA},
    }
    lines[UNSUPPORTED]["body"]["logit_bias"] = {"5": -100}
    lines[WRONG_MODEL]["body"]["model"] = "gpt-4o-mini"
    return lines


def write_jsonl(path: Path, objects: list[dict]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path


@pytest.fixture(scope="module")
def template_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("batch") / "requests.jsonl", batch_requests())


def run_batch_argv(requests: Path, results: Path, model: Path, template: Path, *extra: str) -> list[str]:
    # 4 slots and shards of 3 requests: many shards, so that a killed run leaves some done and some not
    return ["run-batch", "-i", str(requests), "-o", str(results), "--model", str(model), "--chat-template",
            str(template), "--slots", "4", "--shard-rows", "3", "--quiet", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def results(requests_file, tiny_model_dir, template_file, tmp_path_factory) -> Path:
    """The uninterrupted run, in this process (the same job layer and files as on Ray)."""
    out = tmp_path_factory.mktemp("results") / "results.jsonl"
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    try:
        argv = run_batch_argv(
            requests_file, out, tiny_model_dir, template_file, "--in-process", "--price-per-hour", "3"
        )
        assert main(argv) == 0
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]
    return out


def test_every_line_is_a_valid_openai_batch_result(results, tiny_model_dir):
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    requests = batch_requests()
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]  # one per request, in order
    for line, req in zip(lines, requests, strict=True):
        i, body = int(req["custom_id"].split("-")[1]), req["body"]
        assert list(line) == ["id", "custom_id", "response", "error"] and line["id"].startswith("batch_req_")
        if i in (UNSUPPORTED, WRONG_MODEL):
            assert line["response"] is None
            error = BatchError.model_validate(line["error"], strict=True)
            assert error.code == "invalid_request" and error.line == i + 1
            if i == UNSUPPORTED:
                assert error.param == "logit_bias" and "body field 'logit_bias' is not supported" in error.message
            else:
                assert error.param == "model" and "model 'gpt-4o-mini' is not served here" in error.message
                assert "--ignore-model-name" in error.message
            continue
        assert line["error"] is None and line["response"]["status_code"] == 200
        chat = req["url"] == CHAT
        completion = (ChatCompletion if chat else Completion).model_validate(line["response"]["body"], strict=True)
        assert completion.object == ("chat.completion" if chat else "text_completion")
        assert completion.created == int(EPOCH) and completion.model == str(tiny_model_dir)  # the model as given
        assert len(completion.choices) == body.get("n", 1) and completion.system_fingerprint.startswith("fp_")
        assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens >= len(completion.choices)


def greedy_row(body: dict) -> bool:
    """Temperature 0 and nothing that moves the choice away from the model's own most likely token."""
    return body.get("temperature") == 0 and not ({"repetition_penalty", "min_tokens"} & set(body))


def test_logprobs_and_usage_of_each_choice(results):
    lines = {json.loads(line)["custom_id"]: json.loads(line) for line in results.read_text().splitlines()}
    greedy = 0
    for req in batch_requests():
        i, body = int(req["custom_id"].split("-")[1]), req["body"]
        if i in (UNSUPPORTED, WRONG_MODEL):
            continue
        chat = req["url"] == CHAT
        out = lines[req["custom_id"]]["response"]["body"]
        choices = out["choices"]
        assert [c["index"] for c in choices] == list(range(body.get("n", 1)))
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        assert all(c["finish_reason"] in ("stop", "length") for c in choices)
        wants_logprobs = bool(body.get("logprobs")) if chat else "logprobs" in body
        total = 0
        for c in choices:
            if not wants_logprobs:
                assert c["logprobs"] is None
                continue
            if chat:
                content = c["logprobs"]["content"]
                total += len(content)
                assert 1 <= len(content) <= limit
                assert all(len(t["top_logprobs"]) == 3 for t in content)
                assert all(bytes(t["bytes"]).decode("utf-8", "replace") == t["token"] for t in content)
                if greedy_row(body):  # the most likely token is the one chosen
                    assert all(t["top_logprobs"][0]["token"] == t["token"] for t in content)
                    assert all(t["top_logprobs"][0]["logprob"] == t["logprob"] for t in content)
                    greedy += 1
                assert all(t["logprob"] <= 0 and t["top_logprobs"][0]["logprob"] >= t["logprob"] for t in content)
            else:
                lp = c["logprobs"]
                total += len(lp["tokens"])
                assert (
                    len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
                )
                assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"])
                if greedy_row(body):
                    for tok, top in zip(lp["tokens"], lp["top_logprobs"], strict=True):
                        assert max(top, key=top.get) == tok
                    greedy += 1
        if wants_logprobs:
            assert out["usage"]["completion_tokens"] == total  # every generated token, the final eos too
        assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    assert greedy >= 3
    # the JSON-schema request: grammar-constrained; a row that ended on its own is JSON of the schema
    schema_choice = lines[f"request-{JSON_SCHEMA}"]["response"]["body"]["choices"][0]
    if schema_choice["finish_reason"] == "stop":
        jsonschema.validate(json.loads(schema_choice["message"]["content"]), SCHEMA)
    else:
        assert schema_choice["finish_reason"] == "length"


def test_the_job_folder_replays_and_verifies_by_custom_id_and_reports_its_cost(results):
    job_dir = results.with_name("results.job")
    df = pd.read_parquet(job_dir)
    served = [r for r in batch_requests() if r["custom_id"] not in (f"request-{UNSUPPORTED}", f"request-{WRONG_MODEL}")]
    assert len(df) == sum(r["body"].get("n", 1) for r in served) + 2  # and one error row for each of the other two
    row, res, match = replay_row(job_dir, "request-8", 1)  # n=2, the second sample
    assert match and res.text == row["text"]
    report = verify_output(job_dir, sample=1000)
    assert report["checked"] == len(df) - 2 and not (report["mismatches"] or report["missing"] or report["duplicates"])
    s = json.loads((job_dir / "_job.json").read_text())["summary"]
    assert s["prompt_tokens"] == int(df.num_prompt_tokens[df.finish_reason != "error"].sum()) > 0
    assert s["tokens"] == int(df.num_generated_tokens.sum()) > 0
    assert list(s["device_seconds"]) == ["cpu"] and s["device_seconds"]["cpu"] > 0 and s["sessions"] == 1
    assert s["tokens_per_device_hour"] == pytest.approx(s["tokens"] / (s["device_seconds"]["cpu"] / 3600), rel=1e-6)
    cost = s["device_seconds"]["cpu"] / 3600 * 3.0
    assert s["cost_usd"] == pytest.approx(cost, rel=1e-3)
    assert s["usd_per_million_tokens"] == pytest.approx(cost / (s["tokens"] / 1e6), rel=1e-3)


@pytest.mark.slow
def test_a_killed_run_batch_resumes_to_the_same_file_byte_for_byte(
    results, requests_file, tiny_model_dir, template_file, tmp_path, ray_address, monkeypatch
):
    out = tmp_path / "results.jsonl"
    job_dir = tmp_path / "results.job"
    argv = run_batch_argv(requests_file, out, tiny_model_dir, template_file)
    cmd = [sys.executable, "-m", "aitextgen_batch", *argv, "--address", ray_address, "--num-actors", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(job_dir.glob("_done/*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(job_dir.glob("_done/*.json")))
    assert 3 <= finished < 17 and not out.exists()  # an interrupted run writes no results file
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    assert main([*argv, "--in-process"]) == 0  # the rerun resumes (here without Ray: the same job layer and files)
    assert out.read_bytes() == results.read_bytes()
    job = json.loads((job_dir / "_job.json").read_text())
    assert job["summary"]["shards_skipped"] >= finished and job["summary"]["sessions"] == 2
    assert job["sessions"][0]["device_seconds"] > 0  # the killed run's devices count too
    assert main([*argv, "--in-process"]) == 0 and out.read_bytes() == results.read_bytes()  # a finished job: rewritten


def test_a_duplicate_custom_id_or_a_bad_line_is_refused_before_anything_is_written(
    tiny_model_dir, template_file, tmp_path, capsys
):
    requests = batch_requests()[:6]
    out = tmp_path / "results.jsonl"
    for lines, message in [
        (requests[:4] + [requests[2]], "line 5: custom_id 'request-2' is used again (first on line 3)"),
        (requests[:2] + [{**requests[2], "custom_id": 3}], "line 3: custom_id must be a non-empty string"),
    ]:
        inp = write_jsonl(tmp_path / "requests.jsonl", lines)
        capsys.readouterr()
        assert main(run_batch_argv(inp, out, tiny_model_dir, template_file, "--in-process")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not out.exists() and not (tmp_path / "results.job").exists()
    (tmp_path / "requests.jsonl").write_text(json.dumps(requests[0]) + "\n{not json\n")
    assert main(run_batch_argv(tmp_path / "requests.jsonl", out, tiny_model_dir, template_file)) == 2
    assert "requests.jsonl line 2: not valid JSON" in capsys.readouterr().err


SPEC = RequestSpec(["m"], ignore_model_name=False)
BASE = SamplingParams(temperature=1.0, top_k=0)


def one(body: dict, url: str = CHAT, **envelope) -> dict:
    req = translate({"custom_id": "x", "method": "POST", "url": url, "body": body, **envelope}, 1, SPEC, BASE)
    return {k: v for k, v in vars(req).items() if v is not None and k not in ("custom_id", "line")}


def test_a_request_that_cannot_be_served_is_its_own_error_naming_the_field():
    msgs = [{"role": "user", "content": "hi"}]
    ok = one({"model": "m", "messages": msgs, "max_completion_tokens": 5, "top_k": -1, "n": 2, "seed": 3})
    assert json.loads(ok["params"]) == {"max_new_tokens": 5, "top_k": 0, "num_return_sequences": 2}
    assert ok["seed"] == 3 and json.loads(ok["messages"]) == msgs and ok["logprobs"] is False
    parts = one(
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert json.loads(parts["messages"]) == [{"role": "system", "content": "a\nb"}]
    legacy = one({"prompt": ["once"], "logprobs": 2, "max_tokens": 7}, COMPLETIONS)
    assert legacy["prompt"] == "once" and legacy["logprobs"] and json.loads(legacy["params"])["top_logprobs"] == 2
    for body, param, message in [
        ({"messages": msgs, "tools": []}, "tools", "body field 'tools' is not supported by /v1/chat/completions"),
        ({"messages": msgs, "model": "gpt-4o"}, "model", "model 'gpt-4o' is not served here (this job serves 'm')"),
        ({"messages": msgs, "top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs: true"),
        (
            {"messages": msgs, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
            "top_logprobs must be >= 0 and <= 20, got 21",
        ),
        ({"messages": msgs, "max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0"),
        ({"messages": msgs, "temperature": -1}, "temperature", "temperature must be >= 0.0, got -1"),
        ({"messages": msgs, "seed": -5}, "seed", "seed must be an integer in [0, 2**63-1], got -5"),
        ({"messages": msgs, "stream": True}, "stream", "stream must be false in a batch"),
        ({"messages": msgs, "response_format": {"type": "xml"}}, "response_format", "response_format must be"),
        ({"messages": [{"role": "user", "content": "a", "name": "b"}]}, "messages", "field 'name' is not supported"),
        ({"messages": [{"role": "wizard", "content": "a"}]}, "messages", "message 0 has role 'wizard'"),
        ({"messages": msgs, "max_tokens": 4, "max_completion_tokens": 5}, "max_tokens", "differ"),
        ({"prompt": "a", "echo": True}, "echo", "echo must be false"),
    ]:
        url = COMPLETIONS if "prompt" in body else CHAT
        got = one(body, url)
        assert set(got) >= {"request_error", "error_param"} and "params" not in got, body
        assert got["error_param"] == param and message in got["request_error"], (body, got)
    assert one({"prompt": "a"}, "/v1/embeddings")["error_param"] == "url"
    assert one({"prompt": "a"}, ["/v1/completions"])["error_param"] == "url"
    assert one({"prompt": "a"}, COMPLETIONS, method="GET")["error_param"] == "method"
    assert one({"prompt": "a"}, COMPLETIONS, extra=1)["error_param"] == "extra"
    ignore = translate(
        {"custom_id": "x", "url": CHAT, "body": {"messages": msgs, "model": "gpt-4o"}},
        1,
        RequestSpec(["m"], True),
        BASE,
    )
    assert ignore.request_error is None


def test_top_and_prompt_logprob_columns_equal_a_full_forward_pass_and_verify_exactly(tiny_model_dir, tmp_path):
    """`--top-logprobs 5 --prompt-logprobs` in a job: the columns hold the K most likely tokens (a greedy row's first is
    its own token) and each prompt token's log-probability, equal to a Hugging Face full forward within 1e-4; replay and
    verify compare them exactly, and a changed value is a mismatch."""
    import torch

    from aitextgen_batch.models.loading import load_model

    inp = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(6)], "prompt": [words(i, 2 + i) for i in range(6)]}), inp)
    out = tmp_path / "out"
    job = dict(model=str(tiny_model_dir), max_new_tokens=6, top_logprobs=5, prompt_logprobs=True, return_tokens=True)
    s = generate_dataset(
        input=str(inp), output=str(out), temperature=0, shard_rows=3, in_process=True, quiet=True, **job
    )
    assert s.status == "complete"
    table = pq.read_table(out)
    assert table.schema.names[-4:] == ["token_ids", "token_logprobs", "top_logprobs", "prompt_logprobs"]
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    for row in table.to_pylist():
        top = [[(a["token_id"], a["logprob"]) for a in pos] for pos in row["top_logprobs"]]
        generated = row["token_ids"]
        assert len(top) == len(generated) == row["num_generated_tokens"] and all(len(p) == 5 for p in top)
        assert [p[0][0] for p in top] == generated  # greedy: the most likely token is the one chosen
        ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids + generated])).logits[0].double(), dim=-1)
        for j, pos in enumerate(top):
            want = torch.topk(lp[len(ids) - 1 + j], 5)
            assert [t for t, _ in pos] == want.indices.tolist()
            assert np.allclose([v for _, v in pos], want.values.numpy(), atol=1e-4)
        prompt = row["prompt_logprobs"]
        assert prompt[0] is None and len(prompt) == len(ids) == row["num_prompt_tokens"]
        want = lp[: len(ids) - 1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert np.allclose(np.array(prompt[1:], dtype=np.float64), want.numpy(), atol=1e-4)
    _, _, match = replay_row(out, "r4")
    assert match
    report = verify_output(out, sample=100)
    assert (report["checked"], report["mismatches"]) == (6, 0)
    # one top log-probability changed by one float32 step: verify names the row
    part = out / "part-00000.parquet"
    table = pq.read_table(part)
    values = table.column("top_logprobs").to_pylist()
    values[1][0][2]["logprob"] = float(np.nextafter(np.float32(values[1][0][2]["logprob"]), np.float32(0)))
    i = table.schema.get_field_index("top_logprobs")
    pq.write_table(table.set_column(i, "top_logprobs", pa.array(values, table.schema.field(i).type)), part)
    record = json.loads((out / "_done" / "00000.json").read_text())
    blob = part.read_bytes()
    record.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (out / "_done" / "00000.json").write_text(json.dumps(record))
    report = verify_output(out, sample=100)
    assert report["mismatches"] == 1 and report["mismatched_ids"] == [table.column("id")[1].as_py()]


def test_run_batch_flags_default_to_openais_sampling_and_refuse_what_does_not_apply(capsys):
    from aitextgen_batch.cli import parse

    _, cfg = parse(["run-batch", "-i", "r.jsonl", "-o", "out/r.jsonl", "--temperature", "0.5", "--top-logprobs", "2"])
    s = cfg.sampling
    assert (s.temperature, s.top_k, s.top_p, s.lstrip, s.nonempty_output, s.top_logprobs) == (
        0.5,
        0,
        1.0,
        False,
        False,
        2,
    )
    assert cfg.work_dir == "out/r.job" and cfg.job_config().input_format == "openai-batch"
    assert parse(["generate", "--input", "r.jsonl", "--output", "o"])[1].sampling.temperature == 0.7  # generate's own
    for argv, message in [
        (["run-batch", "-i", "r.jsonl", "-o", "w/r.jsonl", "--work-dir", "w"], "lies inside --work-dir 'w'"),
        (["run-batch", "-i", "r.jsonl", "-o", "r.jsonl"], "output (--output) is the request file"),
        (
            ["run-batch", "-i", "r.jsonl", "-o", "o.jsonl", "--price-per-hour", "-1"],
            "price_per_hour (--price-per-hour)",
        ),
        (
            [
                "generate",
                "--input",
                "r.jsonl",
                "--output",
                "o",
                "--input-format",
                "openai-batch",
                "--prompt-column",
                "q",
            ],
            "prompt_column (--prompt-column) does not apply to --input-format openai-batch",
        ),
        (
            ["generate", "--input", "r.jsonl", "--output", "o", "--ignore-model-name"],
            "is for --input-format openai-batch",
        ),
    ]:
        with pytest.raises(SystemExit):
            parse(argv)
        assert message in capsys.readouterr().err, argv


def test_generate_reads_the_same_file_as_rows(results, requests_file, tiny_model_dir, template_file, tmp_path):
    """`generate --input-format openai-batch`: the same requests as Parquet rows, the bytes run-batch's job made (given
    its sampling defaults), ids the custom_ids, each error request an error row naming its field."""
    openai_defaults = dict(temperature=1.0, top_k=0, lstrip=False, nonempty_output=False)
    s = generate_dataset(
        input=str(requests_file), output=str(tmp_path / "rows"), input_format="openai-batch", model=str(tiny_model_dir),
        chat_template=str(template_file), slots=4, shard_rows=50, in_process=True, quiet=True, **openai_defaults,
    )  # fmt: skip
    assert s.status == "complete" and s.shards == 1 and s.error_rows == 2
    a = pd.read_parquet(tmp_path / "rows").set_index(["id", "sample_index"]).sort_index()
    b = pd.read_parquet(results.with_name("results.job")).set_index(["id", "sample_index"]).sort_index()
    cols = ["prompt", "seed", "text", "finish_reason", "error", "url", "line", "error_param", "params"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert a.loc[("request-20", 0), "error"].startswith("body field 'logit_bias' is not supported")
    assert a.loc[("request-3", 0), "seed"] == 1003 and a.loc[("request-8", 0), "prompt"].endswith("<|assistant|>")


def test_the_readmes_hosted_api_batch_file_runs_unchanged_on_the_default_model(tmp_path):
    """The request file of the README (written for a hosted API: its model is gpt-4o-mini), run as it is with
    `--ignore-model-name` on the default model: a chat completion with top log-probabilities, a completion with n=3."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### OpenAI batch files", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, flags=re.S).group(1)
    requests = [json.loads(line) for line in block.splitlines()]
    assert {r["body"]["model"] for r in requests} == {"gpt-4o-mini"}
    (tmp_path / "requests.jsonl").write_text(block)
    out = tmp_path / "results.jsonl"
    argv = ["run-batch", "-i", str(tmp_path / "requests.jsonl"), "-o", str(out), "--ignore-model-name"]
    assert main([*argv, "--in-process", "--slots", "4", "--quiet"]) == 0  # 4 slots: the 4 samples, one step each
    chat_line, completion_line = (json.loads(line) for line in out.read_text().splitlines())
    chat = ChatCompletion.model_validate(chat_line["response"]["body"], strict=True)
    assert chat_line["custom_id"] == "q-1" and chat.model == "smollm2-135m-instruct-q4_1"
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 48
    assert all(len(t.top_logprobs) == 5 for t in chat.choices[0].logprobs.content)
    completion = Completion.model_validate(completion_line["response"]["body"], strict=True)
    assert completion_line["custom_id"] == "q-2" and len(completion.choices) == 3
    assert len({c.text for c in completion.choices}) > 1  # three samples, each from its own seed stream
