"""`make demo`: an end-to-end run of what exists, on a machine with no network.

Trains a byte-level BPE tokenizer on English prose every Python install carries (the standard
library's `pydoc_data.topics`), creates a tiny GPT-2 sized to it, and describes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aitextgen_batch.cli import main


def corpus(path: Path) -> Path:
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    return path


if __name__ == "__main__":
    out = Path("demo_out")
    out.mkdir(exist_ok=True)
    text = corpus(out / "pydoc_topics.txt")
    steps = [
        ["train-tokenizer", "--input", str(text), "--vocab-size", "2000", "--output", str(out / "tokenizer")],
        ["init-model", "--preset", "tiny", "--tokenizer", str(out / "tokenizer"), "--output", str(out / "model")],
    ]
    if (out / "model").exists():
        import shutil

        shutil.rmtree(out / "model")
    for argv in steps:
        print("$ aitextgen-batch " + " ".join(argv))
        rc = main(argv)
        if rc:
            sys.exit(rc)
