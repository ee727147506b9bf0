"""Per-row sampling params: what mixing them in one run costs, in generated tokens per second.

    python jobs/benchmark_synthesis.py             # CPU, 2 threads, pydoc-gpt2, 512 rows (about 3 minutes)
    python jobs/benchmark_synthesis.py --device cuda --rows 4096 --ray-rows 0

The rows: the bundled sample prompts, each rendered as one user message with the shipped chat template
(`aitextgen_batch/assets/chat_template.jinja`), on the bundled small model pydoc-gpt2. Each row gets one of four
parameter sets: temperature 0.7 or 1.0, max_new_tokens 32 or 64 (row i: temperature by i % 2, budget by i // 2 % 2).
Rows end at eos or their budget, as in a real job.

Engine level (`Engine.generate`, the same rows each time; best of `--repeats` after a warm-up):
- uniform: every row with one parameter set (temperature 0.7, max_new_tokens 64): the job without per-row params;
- split:   each of the four groups as its own run (what a user without per-row params does: four jobs);
- mixed:   all rows in one run, each with its own parameter set (what `--params-column` does).
Then, unless `--ray-rows 0`, the same comparison through the Ray job (`generate_dataset`, 2 actors of one thread,
4 shards): a `--params-column` job against a uniform job on the same rows, timed by the actors' seconds in their
shards (row reading, params and prompt checks, generation and writing; start-up and model loads left out).

The last line is `mixed/uniform=X mixed/split=Y` (engine level; the target is mixed/uniform >= 0.9).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import tempfile
import time
from pathlib import Path

TEMPERATURES = (0.7, 1.0)
BUDGETS = (32, 64)


def chat_prompts(n: int, tokenizer) -> list[str]:
    import pyarrow.parquet as pq

    from aitextgen_batch.generation.chat import ChatRenderer
    from aitextgen_batch.samples import SAMPLE_PROMPTS

    renderer = ChatRenderer(tokenizer, Path(__file__).parents[1] / "aitextgen_batch/assets/chat_template.jinja")
    prompts = pq.read_table(SAMPLE_PROMPTS, columns=["prompt"]).column("prompt").to_pylist()
    return [renderer.render_user(p)[0] for p in (prompts * (n // len(prompts) + 1))[:n]]


def row_params(i: int):
    from aitextgen_batch.generation.params import SamplingParams

    return SamplingParams(temperature=TEMPERATURES[i % 2], max_new_tokens=BUDGETS[i // 2 % 2])


def timed(engine, prompts, seeds, params, batch_size) -> tuple[int, float]:
    """(tokens generated, seconds) of one `Engine.generate` call."""
    sync(engine)
    t0 = time.perf_counter()
    results = engine.generate(prompts, seeds, params, batch_size)
    sync(engine)
    return sum(r.num_generated_tokens for r in results), time.perf_counter() - t0


def sync(engine) -> None:
    if engine.device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def engine_table(engine, prompts: list[str], batch_size: int, repeats: int) -> dict[str, tuple[int, float]]:
    from aitextgen_batch.generation.params import SamplingParams

    n = len(prompts)
    seeds = list(range(n))
    mixed = [row_params(i) for i in range(n)]
    uniform = SamplingParams(temperature=TEMPERATURES[0], max_new_tokens=BUDGETS[1])
    groups: dict = {}
    for i, p in enumerate(mixed):
        groups.setdefault((p.temperature, p.max_new_tokens), []).append(i)

    def split():
        tokens = seconds = 0.0
        for rows in groups.values():
            t, s = timed(engine, [prompts[i] for i in rows], [seeds[i] for i in rows], mixed[rows[0]], batch_size)
            tokens, seconds = tokens + t, seconds + s
        return int(tokens), seconds

    runs = {
        "uniform": lambda: timed(engine, prompts, seeds, uniform, batch_size),
        "split": split,
        "mixed": lambda: timed(engine, prompts, seeds, mixed, batch_size),
    }
    warm = min(n, 2 * engine.slots)  # builds the decoders (and on CUDA captures the graphs) of every shape used
    engine.generate(prompts[:warm], seeds[:warm], mixed[:warm], batch_size)
    best: dict[str, tuple[int, float]] = {}
    for _ in range(repeats):  # interleaved, so a slow moment of a shared machine hits every method alike
        for name, run in runs.items():
            tokens, seconds = run()
            if name not in best or tokens / seconds > best[name][0] / best[name][1]:
                best[name] = (tokens, seconds)
    return best


def ray_table(prompts: list[str], work: Path, batch_size: int) -> dict[str, tuple[int, float]]:
    """(tokens, seconds) of the Ray jobs: seconds are the actors' time in their shards (reading rows, params and
    prompts, generating, writing), summed; start-up and model loads, the same for both, are left out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aitextgen_batch.batch.api import generate_dataset
    from aitextgen_batch.batch.verify import load_job

    n = len(prompts)
    params = [
        {"temperature": row_params(i).temperature, "max_new_tokens": row_params(i).max_new_tokens} for i in range(n)
    ]
    pq.write_table(pa.table({"id": list(range(n)), "prompt": prompts, "p": params}), work / "rows.parquet")
    common = dict(
        input=str(work / "rows.parquet"),
        model="pydoc-gpt2",
        num_actors=2,
        shard_rows=max(1, n // 4),
        batch_size=batch_size,
    )
    out = {}
    for name, extra in [
        ("uniform", {"temperature": TEMPERATURES[0], "max_new_tokens": BUDGETS[1]}),
        ("mixed", {"params_column": "p"}),
    ]:
        with contextlib.redirect_stdout(io.StringIO()):  # the job's summary table
            s = generate_dataset(output=str(work / name), quiet=True, **common, **extra)
        out[name] = (s.tokens, sum(shard.seconds for shard in load_job(work / name).shards))
    return out


def print_table(title: str, rows: dict[str, tuple[int, float]]) -> None:
    print(f"\n{title}\n{'run':<10}{'tokens':>10}{'seconds':>10}{'tokens/s':>10}{'vs uniform':>12}")
    ref = rows["uniform"][0] / rows["uniform"][1]
    for name, (tokens, seconds) in rows.items():
        rate = tokens / seconds
        print(f"{name:<10}{tokens:>10,}{seconds:>10.2f}{rate:>10,.0f}{rate / ref:>11.2f}x")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)  # runs of a few seconds: a shared machine needs several
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ray-rows", type=int, default=256, help="rows of the Ray job comparison; 0 skips it")
    args = ap.parse_args()

    import torch

    from aitextgen_batch.generation.engine import Engine

    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained("pydoc-gpt2", device=args.device)
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else cpu_name()
    print(
        f"machine: {device}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"model: pydoc-gpt2 ({engine.dtype}), slots {engine.slots}, prefill rows {engine.prefill_rows}"
    )
    prompts = chat_prompts(args.rows, engine.tokenizer)
    rows = engine_table(engine, prompts, args.batch_size, args.repeats)
    print_table(f"engine: {args.rows} rows, best of {args.repeats}", rows)
    if args.ray_rows:
        with tempfile.TemporaryDirectory() as work:
            ray_rows = ray_table(chat_prompts(args.ray_rows, engine.tokenizer), Path(work), args.batch_size)
        print_table(f"Ray job: {args.ray_rows} rows, 2 actors x 1 thread, seconds in shards (summed)", ray_rows)
    rate = {k: t / s for k, (t, s) in rows.items()}
    print(f"\nmixed/uniform={rate['mixed'] / rate['uniform']:.2f} mixed/split={rate['mixed'] / rate['split']:.2f}")


if __name__ == "__main__":
    main()
