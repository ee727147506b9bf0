"""`make demo`: a dataset-synthesis job on the default model, end to end on this machine, with no download.

64 chat requests of three kinds (questions with a known short answer, instructions, rewrites; from
`aitextgen_batch.samples`) go to 2 Ray actors as JSONL conversations, with a system prompt and per-row sampling
params (questions cold, instructions hot, rewrites in between), log-probabilities and token lists. The default model
is SmolLM2-135M-Instruct (a 4-bit GGUF from a pinned wheel, converted once by `make model`), with its own chat
template. Then: the job's summary, answers of each kind, how many questions were answered correctly (the reply
contains the answer), the rows filtered by mean log-probability, one row replayed alone byte for byte, and `verify`
re-generating a random sample. Last, structured output: for each of 32 topics a JSON object
`{"question", "answer", "difficulty"}` under a JSON Schema (`--json-schema`), and the share of valid rows.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from aitextgen_batch.cli import main
from aitextgen_batch.samples import chat_samples, is_correct

OUT = Path("demo_out")
SYSTEM = "You are a helpful assistant. Answer briefly."
# Per-row sampling: questions cold (the likeliest answer), instructions hot (variety), rewrites in between.
PARAMS = {
    "question": {"temperature": 0.2, "max_new_tokens": 48},
    "instruction": {"temperature": 1.0, "top_p": 0.95},
    "rewrite": {"temperature": 0.5},
}


def step(argv: list[str]) -> None:
    print("\n$ aitextgen-batch " + " ".join(argv), flush=True)
    rc = main(argv)
    if rc:
        sys.exit(rc)


def write_requests(path: Path) -> list[dict]:
    rows = chat_samples()
    with open(path, "w") as f:
        for r in rows:
            messages = [{"role": "user", "content": r["content"]}]
            f.write(json.dumps({"id": r["id"], "messages": messages, "params": PARAMS[r["kind"]]}) + "\n")
    return rows


SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string", "maxLength": 160},
        "answer": {"type": "string", "maxLength": 120},
        "difficulty": {"enum": ["easy", "medium", "hard"]},
    },
    "required": ["question", "answer", "difficulty"],
    "additionalProperties": False,
}
TOPICS = (
    "the moon, bees, rain, volcanoes, the ocean, trees, music, bread, rivers, deserts, the sun, cats, chess, glass, "
    "clouds, maps, salt, bridges, honey, snow, coffee, paper, stars, wolves, rice, wind, gold, ice, birds, bicycles, "
    "tea, mountains"
).split(", ")


def json_job() -> None:
    """Structured output: one JSON object per topic, constrained by a JSON Schema; the share of valid rows."""
    import pandas as pd

    requests = OUT / "topics.jsonl"
    with open(requests, "w") as f:
        for i, topic in enumerate(TOPICS):
            prompt = f"Write a quiz question about {topic}, with its answer and difficulty, as a JSON object."
            f.write(json.dumps({"id": f"topic-{i:02d}", "prompt": prompt}) + "\n")
    (OUT / "quiz.schema.json").write_text(json.dumps(SCHEMA, indent=1))
    out = OUT / "quiz"
    step(
        [
            "generate",
            "--input",
            str(requests),
            "--output",
            str(out),
            "--chat",
            "--json-schema",
            str(OUT / "quiz.schema.json"),
            "--max-new-tokens",
            "96",
            "--num-actors",
            "2",
            "--shard-rows",
            "16",
            "--overwrite",
        ]
    )
    df = pd.read_parquet(out).sort_values("id")
    print(f"\nJSON rows valid (parsed and checked against the schema): {int(df.valid.sum())} of {len(df)}")
    for r in df.head(3).itertuples():
        print(f"  [{r.id}] {r.text}")


if __name__ == "__main__":
    import pandas as pd

    t0 = time.time()
    OUT.mkdir(exist_ok=True)
    requests = OUT / "requests.jsonl"
    rows = write_requests(requests)
    out = OUT / "synth"
    step(
        [
            "generate",
            "--input",
            str(requests),
            "--output",
            str(out),
            "--messages-column",
            "messages",
            "--system-prompt",
            SYSTEM,
            "--params-column",
            "params",
            "--max-new-tokens",
            "64",
            "--logprobs",
            "--return-tokens",
            "--num-actors",
            "2",
            "--shard-rows",
            "32",
            "--overwrite",
        ]
    )
    df = pd.read_parquet(out).set_index("id").loc[[r["id"] for r in rows]]
    kinds = {r["id"]: r["kind"] for r in rows}
    df["kind"] = [kinds[i] for i in df.index]
    print(f"\n{len(df)} rows in {out}; the rendered prompt of the first:\n{df.prompt.iloc[0]}")
    for kind in ("question", "instruction", "rewrite"):
        print(f"\n--- {kind}s (params {PARAMS[kind]})")
        for r, item in zip(df[df.kind == kind].head(3).itertuples(), [x for x in rows if x["kind"] == kind][:3]):
            print(f"[{r.Index}] {item['content']}\n  -> {r.text[:200]!r} ({r.finish_reason})")

    questions = [r for r in rows if r["answers"]]
    right = [r["id"] for r in questions if is_correct(df.text[r["id"]], r["answers"])]
    print(f"\nquestions answered correctly (the reply contains the answer): {len(right)} of {len(questions)}")
    wrong = [r for r in questions if r["id"] not in right][:3]
    for r in wrong:
        print(f"  missed: {r['content']} -> {df.text[r['id']][:120]!r} (expected {r['answers'][0]!r})")

    ok = df[df.finish_reason != "error"].copy()
    ok["mean_logprob"] = ok.cumulative_logprob / ok.num_generated_tokens
    keep = ok[ok.mean_logprob > -1.0]
    print(f"\nrows with mean log-probability per token > -1.0: {len(keep)} of {len(ok)} (a likelihood filter)")
    print(keep.groupby("kind").size().to_string())

    step(["replay", "--output", str(out), "--id", ok.index[0]])
    step(["verify", "--output", str(out), "--sample", "8"])
    json_job()
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
