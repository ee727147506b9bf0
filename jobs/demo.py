"""`make demo`: the main job end to end on this machine, with no download.

Generates text for the 1,200 bundled sample prompts with 2 Ray actors on the bundled default model,
prints a few rows and the summary, then re-generates a random sample of rows to show they replay byte
for byte. Then a small dataset-synthesis job: 24 chat conversations handed over as JSONL, rendered with
the shipped chat template and a system prompt, half of them sampled hot and half cold (per-row params),
with log-probabilities; its rows are filtered by mean log-probability, and one is replayed alone. The
default model is no instruct model and writes fragments of Python documentation: the mechanics are what
is shown. (If the package has no default model, a tiny untrained one is built first.)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from aitextgen_batch.cli import main
from aitextgen_batch.models.loading import DEFAULT_MODEL
from aitextgen_batch.samples import SAMPLE_PROMPTS, SUBJECTS

OUT = Path("demo_out")
CHAT_TEMPLATE = Path(__file__).parents[1] / "aitextgen_batch" / "assets" / "chat_template.jinja"


def step(argv: list[str]) -> None:
    print("\n$ aitextgen-batch " + " ".join(argv), flush=True)
    rc = main(argv)
    if rc:
        sys.exit(rc)


def fallback_model() -> list[str]:
    """A tiny untrained model (tokenizer from the stdlib's pydoc topics) for packages without the default."""
    from pydoc_data.topics import topics

    OUT.mkdir(exist_ok=True)
    corpus = OUT / "pydoc_topics.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    shutil.rmtree(OUT / "model", ignore_errors=True)
    step(["train-tokenizer", "--input", str(corpus), "--vocab-size", "2000", "--output", str(OUT / "tokenizer")])
    step(["init-model", "--preset", "tiny", "--tokenizer", str(OUT / "tokenizer"), "--output", str(OUT / "model")])
    return ["--model", str(OUT / "model")]


def chat_job(model: list[str]) -> None:
    """Chat messages in (JSONL), per-row params and log-probabilities out; filter, then replay one row alone."""
    import json

    import pandas as pd

    conversations = OUT / "conversations.jsonl"
    with open(conversations, "w") as f:
        for i, subject in enumerate(SUBJECTS[:24]):
            messages = [{"role": "user", "content": f"What does the {subject} do?"}]
            if i % 4 == 3:
                messages = [{"role": "user", "content": "Define it briefly."}, *messages]
            params = {"temperature": 1.0, "max_new_tokens": 40} if i % 2 else {"temperature": 0.3}
            f.write(json.dumps({"id": f"chat-{i:02d}", "messages": messages, "params": params}) + "\n")
    out = OUT / "chat"
    step(
        [
            "generate",
            "--input",
            str(conversations),
            "--output",
            str(out),
            *model,
            "--messages-column",
            "messages",
            "--chat-template",
            str(CHAT_TEMPLATE),
            "--system-prompt",
            "You explain Python to beginners.",
            "--params-column",
            "params",
            "--max-new-tokens",
            "24",
            "--logprobs",
            "--num-actors",
            "1",  # 24 short rows: a second actor would cost more to start than it saves
            "--shard-rows",
            "12",
            "--overwrite",
        ]
    )
    df = pd.read_parquet(out)
    df["mean_logprob"] = df.cumulative_logprob / df.num_generated_tokens
    best = df[df.finish_reason != "error"].sort_values("mean_logprob", ascending=False)
    print(f"\n{len(df)} chat rows in {out}; the rendered prompt of the first:\n{df.prompt.iloc[0]}")
    print("the three most likely replies (by mean log-probability per token):")
    for r in best.head(3).itertuples():
        p = json.loads(r.params)
        print(f"\n[{r.id} temperature={p['temperature']} mean_logprob={r.mean_logprob:.2f}]\n  {r.text[:160]!r}")
    step(["replay", "--output", str(out), "--id", best.id.iloc[0]])


if __name__ == "__main__":
    import pandas as pd

    model = [] if (DEFAULT_MODEL / "model.safetensors").exists() else fallback_model()
    out = OUT / "generate"
    step(
        [
            "generate",
            "--input",
            str(SAMPLE_PROMPTS),
            "--output",
            str(out),
            *model,
            "--num-actors",
            "2",
            "--shard-rows",
            "100",
            "--max-new-tokens",
            "32",
            "--keep-columns",
            "topic",
            "--overwrite",
        ]
    )
    df = pd.read_parquet(out)
    print(f"\n{len(df)} rows in {out}; a few of them:")
    for r in df.sample(5, random_state=0).itertuples():
        print(f"\n[{r.id} seed={r.seed} {r.finish_reason}]\n  prompt: {r.prompt}\n  text:   {r.text[:200]!r}")
    step(["verify", "--output", str(out), "--sample", "16"])
    chat_job(model)
