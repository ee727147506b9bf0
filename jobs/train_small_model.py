"""Reproduce the shipped small model (aitextgen_batch/assets/pydoc_gpt2/, `--model pydoc-gpt2`) end to end with this
pipeline.

    .venv/bin/python jobs/train_small_model.py [--workdir /tmp/small-model] [--max-steps 1200]

1. corpus: the English reference prose every Python install carries, `pydoc_data.topics` (all topics, sorted by
   name), plus the docstrings of a fixed list of standard-library modules and of their public classes, functions
   and methods (>= 80 characters, deduplicated, in a fixed order): one JSONL line per document. Both are part of
   CPython, under the Python Software Foundation License. The text differs a little between Python versions: the
   README written next to the model records the version and the corpus's sha256.
2. `train_tokenizer`: byte-level BPE, 5,000 tokens.
3. a from-scratch GPT-2 (4 layers, 256 wide, 4 heads, 256 positions: 4.5M parameters, 18 MB of fp32 safetensors),
   weights seeded with 0.
4. `prepare`: the token cache (4 shards).
5. `finetune`: 1,200 steps on 1 worker, batch 8 x 256 tokens, learning rate 1e-3 with 100 warmup steps, seed 0.
6. the final model is copied into the package with a README (corpus, licence, final loss, samples).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import platform
import shutil
from pathlib import Path

ASSET = Path(__file__).resolve().parents[1] / "aitextgen_batch" / "assets" / "pydoc_gpt2"
ARCH = {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 256}
MODULES = """abc argparse ast asyncio.events asyncio.tasks base64 bisect calendar cmd codecs collections
concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib doctest email.message
enum fileinput fnmatch fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html.parser
http.client http.cookiejar http.server imaplib inspect io ipaddress itertools json logging logging.handlers
mailbox math mimetypes multiprocessing.pool numbers operator optparse os pathlib pdb pickle pkgutil platform
poplib pprint pydoc queue quopri random re sched secrets selectors shelve shlex shutil smtplib socket
socketserver sqlite3 statistics string struct subprocess tarfile tempfile textwrap threading timeit tokenize
trace traceback types typing unittest.case urllib.parse urllib.request uuid warnings wave weakref
xml.dom.minidom xml.etree.ElementTree zipfile zipimport zoneinfo""".split()
PROMPTS = ["The", "If the", "This module"]


def documents() -> list[str]:
    """The corpus, in its fixed order: pydoc topics, then module, class, function and method docstrings."""
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics)]
    seen = set(docs)
    for name in MODULES:
        module = importlib.import_module(name)
        objects = [module]
        for attr in sorted(dir(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                objects.append(obj)
            if inspect.isclass(obj):
                members = vars(obj)
                objects += [
                    members[a] for a in sorted(members) if not a.startswith("_") and inspect.isfunction(members[a])
                ]
        for obj in objects:
            doc = inspect.cleandoc((module.__doc__ if obj is module else inspect.getdoc(obj)) or "")
            if len(doc) >= 80 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def init_gpt2(tokenizer_dir: Path, output: Path) -> None:
    """The from-scratch model, sized to the tokenizer like the presets are (see `models/presets.py`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aitextgen_batch import load_tokenizer
    from aitextgen_batch.models.loading import quiet_transformers

    quiet_transformers()
    tok = load_tokenizer(tokenizer_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = AutoConfig.for_model("gpt2", vocab_size=len(tok), **ids, **ARCH)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(output))
    tok.save_pretrained(str(output))


def samples(folder: Path) -> list[str]:
    from aitextgen_batch import Engine, SamplingParams

    engine = Engine.from_pretrained(str(folder), device="cpu")
    params = SamplingParams(max_new_tokens=40, temperature=0.7)
    return [
        p + " " * (not r.text.startswith(" ")) + r.text
        for p, r in zip(PROMPTS, engine.generate(PROMPTS, [1, 2, 3], params))
    ]


def main() -> None:
    from aitextgen_batch.data.commands import PrepareConfig, run_prepare
    from aitextgen_batch.tokenizer import train_tokenizer
    from aitextgen_batch.train import finetune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/small-model"))
    parser.add_argument("--max-steps", type=int, default=1200)
    parser.add_argument("--install-to", type=Path, default=ASSET, help="where the model goes (default: the package)")
    args = parser.parse_args()
    dest = args.install_to
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    docs = documents()
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)):,} characters, sha256 {digest}")
    train_tokenizer(texts=docs, vocab_size=5000, output=work / "tokenizer", min_frequency=2)
    init_gpt2(work / "tokenizer", work / "init")
    run_prepare(
        PrepareConfig(input=[corpus], tokenizer=work / "init", output=work / "cache", num_shards=4, field="text")
    )
    summary = finetune(
        model=str(work / "init"),
        dataset=work / "cache",
        output=work / "out",
        num_workers=1,
        max_steps=args.max_steps,
        batch_size=8,
        block_size=256,
        learning_rate=1e-3,
        warmup_steps=100,
        save_every=250,
        generate_every=250,
        seed=0,
    )
    print(summary)
    if summary["status"] != "complete":
        raise SystemExit(1)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in sorted((work / "out").iterdir()):
        if f.name in ("config.json", "generation_config.json", "model.safetensors") or f.name.startswith("tokenizer"):
            shutil.copyfile(f, dest / f.name)
    write_readme(dest, summary, len(docs), digest, args.max_steps, samples(dest))


def write_readme(dest: Path, summary: dict, n_docs: int, digest: str, steps: int, texts: list[str]) -> None:
    mb = (dest / "model.safetensors").stat().st_size / 1e6
    lines = [
        "# pydoc-gpt2: the small model of aitextgen-batch",
        "",
        f"A from-scratch GPT-2 ({ARCH['n_layer']} layers, {ARCH['n_embd']} wide, {ARCH['n_head']} heads, "
        f"{ARCH['n_positions']} positions; {mb:.1f} MB of fp32 safetensors) and its byte-level BPE tokenizer "
        "(5,000 tokens), loaded with `--model pydoc-gpt2` (tests, the finetune example). It writes English-like "
        "fragments of Python documentation: "
        "it is a demo and test model, not a useful language model.",
        "",
        "## Corpus and licence",
        "",
        f"{n_docs} documents from the Python {platform.python_version()} standard library: all of "
        "`pydoc_data.topics` (the language reference prose `help()` shows) and the docstrings of a fixed list of "
        "standard-library modules and their public classes, functions and methods. Both are part of CPython and "
        "are distributed under the Python Software Foundation License Version 2 (see LICENSE). Corpus "
        f"(`corpus.jsonl`, one JSON line per document) sha256: `{digest}`.",
        "",
        "## Training and how to retrain",
        "",
        f"Tokenizer, token cache and finetune with this package's own pipeline: {steps} steps of 8 x 256 tokens on 1 "
        f"CPU worker (2 threads), AdamW at 1e-3 with 100 warmup steps then linear decay, seed 0. Final smoothed "
        f"training loss: {summary['loss']}. Reproduce with:",
        "",
        "    .venv/bin/python jobs/train_small_model.py",
        "",
        "## Samples (temperature 0.7, seeds 1, 2, 3)",
        "",
        *[f"- {t!r}" for t in texts],
        "",
    ]
    (dest / "README.md").write_text("\n".join(lines))
    (dest / "LICENSE").write_text(PSF_NOTE)


PSF_NOTE = """The training text of this model (the `pydoc_data.topics` module and standard-library docstrings) is
part of CPython: Copyright (c) 2001 Python Software Foundation; All Rights Reserved. It is used under the PYTHON
SOFTWARE FOUNDATION LICENSE VERSION 2, whose full text is at https://docs.python.org/3/license.html and in the
LICENSE file of every CPython distribution. The model weights are derived from that text by aitextgen-batch's
jobs/train_small_model.py.
"""


if __name__ == "__main__":
    main()
