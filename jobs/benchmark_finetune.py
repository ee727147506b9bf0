"""Finetuning throughput: tokens/s with 1 and 2 Ray Train workers on this CPU, one thread each (data parallel).

    .venv/bin/python jobs/benchmark_finetune.py [--preset small] [--steps 30] [--batch-size 8] [--block-size 128]
    ray job submit --working-dir . -- python jobs/benchmark_finetune.py --workers 1 2 4

One model (a from-scratch preset, `small` by default: 6 layers x 384, sized to a 5k byte-level BPE trained on the
standard library's pydoc topics), one token cache of those topics (4 shards), the same per-worker batch: N workers
train on N times the tokens per step (weak scaling, as DDP does). Each run is a real `finetune` (Lightning DDP over
gloo on Ray Train); its rate is measured from its own metrics.csv after the first `--skip` steps, so worker start-up
and the first, slower steps are left out. The last line is `2w/1w=X.XX` (target: >= 1.6).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path


def build(workdir: Path, preset: str) -> tuple[Path, Path]:
    from pydoc_data.topics import topics

    from aitextgen_batch.data import TokenDataset
    from aitextgen_batch.tokenizer import init_model, train_tokenizer

    texts = [topics[k] for k in sorted(topics)]
    train_tokenizer(texts=texts, vocab_size=5000, output=workdir / "tok")
    model = init_model(preset, workdir / "tok", workdir / "model", seed=0)
    TokenDataset.from_texts(texts, model, workdir / "cache", num_shards=4)
    return model, workdir / "cache"


def steady_rate(metrics: Path, skip: int) -> tuple[float, float]:
    """(tokens/s, seconds per step) between step `skip` and the last step."""
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    a, b = rows[skip - 1], rows[-1]
    seconds = float(b["seconds"]) - float(a["seconds"])
    return (int(b["tokens"]) - int(a["tokens"])) / seconds, seconds / (int(b["step"]) - int(a["step"]))


def main() -> None:
    import ray

    from aitextgen_batch.console import print_table
    from aitextgen_batch.train import finetune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the rate")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    model, cache = build(work, args.preset)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(args.workers), logging_level="WARNING")  # a new local Ray
    results = {}
    for n in args.workers:
        summary = finetune(
            model=str(model),
            dataset=cache,
            output=work / f"out-{n}",
            num_workers=n,
            threads=1,
            max_steps=args.steps,
            batch_size=args.batch_size,
            block_size=args.block_size,
            save_every=args.steps,
            generate_every=0,
            quiet=True,
        )
        rate, step = steady_rate(work / f"out-{n}" / "metrics.csv", args.skip)
        results[n] = rate
        print_table(
            {
                "workers x threads": f"{n} x 1",
                "tokens/step": n * args.batch_size * args.block_size,
                "seconds/step": f"{step:.3f}",
                "tokens/s": f"{rate:,.0f}",
                f"speedup vs {args.workers[0]} worker(s)": f"{rate / results[args.workers[0]]:.2f}",
                "final loss": summary["loss"],
            },
            title=f"{args.preset}: {n} worker(s)",
        )
    if 1 in results and 2 in results:
        print(f"2w/1w={results[2] / results[1]:.2f}")


if __name__ == "__main__":
    main()
