"""Ray generation job vs the in-process engine: throughput, actor scaling and memory.

    python jobs/benchmark_ray.py                  # 2,000 prompts; RSS at 2,000 vs 20,000 prompts
    python jobs/benchmark_ray.py --prompts 500    # a quicker look

Every measurement runs in its own subprocess (its own local Ray with 2 CPUs), on one model (the bundled
small model pydoc-gpt2: GPT-2 4 layers x 256, vocabulary 5,000) and the same prompts. Rows: the in-process engine
(2 threads); the Ray job with 1 actor x 2 threads (same cores); 1 actor x 1 thread vs 2 actors x 1 thread;
peak RSS of the driver and of each actor for N and 10 N prompts. Targets: Ray >= 0.85x in-process,
2 actors >= 1.8x 1 actor, RSS ratio (10 N / N) < 1.2.

    python jobs/benchmark_ray.py --small-shards   # the default model, 128 chat requests in shards of 16 rows

`--small-shards`: shards smaller than an actor's slots (16 rows on 64 slots) on the default model: the Ray job
(1 actor x 2 threads) against the same job `--in-process` (2 threads), both through the job layer, model load
included. Target: Ray >= 0.8x in-process (an actor runs small shards together: `runner.take_group`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def setup(work: Path, prompts: int) -> None:
    from pydoc_data.topics import topics

    import pyarrow as pa
    import pyarrow.parquet as pq

    if not (work / "model").exists():  # the bundled small model: GPT-2 4 x 256, vocab 5,000
        from aitextgen_batch.models.default import SMALL_MODEL

        (work / "model").symlink_to(SMALL_MODEL)
    words = " ".join(topics[k] for k in sorted(topics)).split()
    for n in (prompts, prompts * 10):
        path = work / f"prompts-{n}.parquet"
        if not path.exists():
            ps = [" ".join(words[(i * 37) % (len(words) - 40) :][: 3 + i % 30]) for i in range(n)]
            pq.write_table(pa.table({"id": list(range(n)), "prompt": ps}), path)


def _actor_rss_sampler(stop: threading.Event, peak: dict) -> None:
    import psutil

    while not stop.is_set():
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any("GenerationWorker" in c for c in (p.info["cmdline"] or [])):
                    peak[p.pid] = max(peak.get(p.pid, 0), p.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.2)


def child(args) -> None:
    """One measurement; prints a JSON line."""
    work = Path(args.work)
    prompts = work / f"prompts-{args.n}.parquet"
    if args.mode == "inprocess":
        import pyarrow.parquet as pq
        import torch

        from aitextgen_batch.generation import Engine, SamplingParams, derive_seed

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        engine = Engine.from_pretrained(str(work / "model"), device="cpu")
        table = pq.read_table(prompts)
        ids, ps = table.column("id").to_pylist(), table.column("prompt").to_pylist()
        res = engine.generate(
            ps, [derive_seed(0, i, 0) for i in ids], SamplingParams(max_new_tokens=args.tokens), batch_size=256
        )
        secs = time.perf_counter() - t0
        tokens = sum(r.num_generated_tokens for r in res)
        print(json.dumps({"tokens": tokens, "seconds": secs, "driver_rss": _self_rss(), "actor_rss": 0}))
        return
    import ray

    from aitextgen_batch.batch.api import generate_dataset

    if args.mode == "small-shards-here":
        t0 = time.perf_counter()
        s = generate_dataset(**_small_shard_job(work, Path(tempfile.mkdtemp(dir=work)) / "out"), in_process=True)
        print(json.dumps({"tokens": s["tokens"], "seconds": time.perf_counter() - t0}))
        return

    ray.init(address="local", num_cpus=2, logging_level="ERROR")  # never a head another run started
    stop, peak = threading.Event(), {}
    sampler = threading.Thread(target=_actor_rss_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    out = Path(tempfile.mkdtemp(dir=work)) / "out"
    t0 = time.perf_counter()
    if args.mode == "small-shards-ray":
        s = generate_dataset(**_small_shard_job(work, out), num_actors=1)
        print(json.dumps({"tokens": s["tokens"], "seconds": time.perf_counter() - t0}))
        return
    s = generate_dataset(
        input=str(prompts),
        output=str(out),
        model=str(work / "model"),
        num_actors=args.actors,
        threads=args.threads,
        max_new_tokens=args.tokens,
        shard_rows=250,
        batch_size=256,
        quiet=True,
    )
    secs = time.perf_counter() - t0
    stop.set()
    sampler.join()
    print(
        json.dumps(
            {
                "tokens": s["tokens"],
                "seconds": secs,
                "driver_rss": _self_rss(),
                "actor_rss": max(peak.values()) if peak else 0,
            }
        )
    )


def _small_shard_job(work: Path, out: Path) -> dict:
    """128 chat requests (the 64 samples twice) on the default model, in shards of 16 rows, 2 threads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aitextgen_batch.samples import chat_samples

    path = work / "chat.parquet"
    if not path.exists():
        rows = chat_samples() * 2
        pq.write_table(pa.table({"id": list(range(len(rows))), "prompt": [r["content"] for r in rows]}), path)
    return dict(input=str(path), output=str(out), chat=True, max_new_tokens=64, shard_rows=16, threads=2, quiet=True)


def _self_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(work: Path, mode: str, n: int, tokens: int, actors: int = 1, threads: int = 2) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--work",
        str(work),
        "--mode",
        mode,
        "--n",
        str(n),
        "--tokens",
        str(tokens),
        "--actors",
        str(actors),
        "--threads",
        str(threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rss-tokens", type=int, default=4, help="new tokens per row in the memory runs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work")
    ap.add_argument("--mode")
    ap.add_argument("--n", type=int)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small-shards", action="store_true", help="the default model in shards of 16 rows")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.small_shards:
        with tempfile.TemporaryDirectory() as d:
            here = run(Path(d), "small-shards-here", 0, 0)
            ray_job = run(Path(d), "small-shards-ray", 0, 0)
        print("\n128 chat requests, default model, --shard-rows 16, 64 slots, 2 threads (times include model load)")
        for name, r in (("job --in-process", here), ("Ray job, 1 actor x 2 threads", ray_job)):
            print(f"{name:<32} {r['tokens']:>8} {r['seconds']:>8.2f} {r['tokens'] / r['seconds']:>8.1f} tok/s")
        print(f"\nray/inprocess={ray_job['tokens'] / ray_job['seconds'] / (here['tokens'] / here['seconds']):.2f}")
        return
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        setup(work, args.prompts)
        n, t = args.prompts, args.max_new_tokens
        rows = {
            "in-process engine, 2 threads": run(work, "inprocess", n, t, threads=2),
            "Ray job, 1 actor x 2 threads": run(work, "ray", n, t, actors=1, threads=2),
            "Ray job, 1 actor x 1 thread": run(work, "ray", n, t, actors=1, threads=1),
            "Ray job, 2 actors x 1 thread": run(work, "ray", n, t, actors=2, threads=1),
        }
        small = run(work, "ray", n, args.rss_tokens, actors=2, threads=1)
        big = run(work, "ray", n * 10, args.rss_tokens, actors=2, threads=1)
    print(f"\n{n} prompts, {t} new tokens, pydoc-gpt2 (GPT-2 4x256, vocab 5k), 2 CPUs (times include model load)")
    print(f"{'run':<32} {'tokens':>8} {'seconds':>8} {'tok/s':>8}")
    rate = {}
    for name, r in rows.items():
        rate[name] = r["tokens"] / r["seconds"]
        print(f"{name:<32} {r['tokens']:>8} {r['seconds']:>8.2f} {rate[name]:>8.0f}")
    mb = 1 << 20
    print(f"\n{'peak RSS (MB)':<32} {n:>8} {n * 10:>8} {'ratio':>8}")
    for key, label in (("driver_rss", "driver"), ("actor_rss", "largest actor")):
        print(f"{label:<32} {small[key] / mb:>8.0f} {big[key] / mb:>8.0f} {big[key] / small[key]:>8.2f}")
    ray_vs = rate["Ray job, 1 actor x 2 threads"] / rate["in-process engine, 2 threads"]
    scale = rate["Ray job, 2 actors x 1 thread"] / rate["Ray job, 1 actor x 1 thread"]
    print(
        f"\nray/inprocess={ray_vs:.2f} two_actors/one_actor={scale:.2f} "
        f"rss_ratio_driver={big['driver_rss'] / small['driver_rss']:.2f} "
        f"rss_ratio_actor={big['actor_rss'] / small['actor_rss']:.2f}"
    )


if __name__ == "__main__":
    main()
