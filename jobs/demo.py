"""`make demo`: the main job end to end on this machine, with no download.

Generates text for the 1,200 bundled sample prompts with 2 Ray actors on the bundled default model,
prints a few rows and the summary, then re-generates a random sample of rows to show they replay byte
for byte. (If the package has no default model, a tiny untrained one is built first.)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from aitextgen_batch.cli import main
from aitextgen_batch.models.loading import DEFAULT_MODEL
from aitextgen_batch.samples import SAMPLE_PROMPTS

OUT = Path("demo_out")


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
