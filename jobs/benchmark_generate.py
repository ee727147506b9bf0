"""Generation speed: the batch-invariant engine against Hugging Face `generate`, side by side in one run.

    python jobs/benchmark_generate.py              # CPU, the default model: chat and early finish at 1 and 2 threads
    python jobs/benchmark_generate.py --model DIR  # any model folder with a chat template
    python jobs/benchmark_generate.py --toy        # also the pydoc-gpt2 and preset workloads of earlier releases
    python jobs/benchmark_generate.py --device cuda --threads 1 --slots 256 --hf-batch 64 128 256 --compiled

Every method runs the same rows after a warm-up batch (graph capture, compilation and first-call costs are reported
apart), and counts each row's generated tokens up to and including its eos. Workloads:

- chat: the 64 chat requests of `aitextgen_batch.samples` (questions, instructions, rewrites) x `--copies`, each copy
  with its own seed, a short system prompt, the model's chat template, temperature 0.7, top-k 50, at most
  `--max-new-tokens` (64) new tokens. Methods: HF `generate` batched (left padding, sdpa attention, each
  `--hf-batch` size; the best counts), HF static cache + `torch.compile` (`--compiled`), the engine with and without
  slot refill (default slots unless `--slots`).
- early finish (a generous max_new_tokens): the 32 questions x `--copies`, "answer in one short sentence", the same
  sampling, at max_new_tokens 64 and 1,024: most rows end at eos long before either limit. The engine at 1,024
  against itself at 64, and against HF batched at both.
- constrained (`--constrained`): 256 requests for a JSON object `{"question", "answer", "difficulty"}` about 32
  topics, temperature 0.7, at most 96 tokens: the engine with the JSON Schema (llguidance masks each step's logits)
  against the same rows unconstrained, and the share of rows that end valid.
- toy (`--toy`): pydoc-gpt2 (GPT-2 4 x 256, vocabulary 5,000) with stop "\\n\\n" and 192 new tokens on the bundled
  sample prompts, and a random `small` preset held to exactly 64 new tokens: the workloads earlier releases were
  measured on (no-regression targets: engine/hf_batched >= 1.0, refill/no_refill >= 1.2).

The last lines give the ratios the targets are stated in. Note the machine's load (`uptime`) beside any number.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

SYSTEM = "You are a helpful assistant. Answer briefly."
SHORT = "Answer in one short sentence."


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def chat_prompts(tok, copies: int, system: str, kinds=("question", "instruction", "rewrite")) -> list[str]:
    from aitextgen_batch.samples import chat_samples

    rows = [r for r in chat_samples() if r["kind"] in kinds]
    one = [
        tok.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": r["content"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for r in rows
    ]
    return one * copies


class HF:
    """Hugging Face `generate` the ways users run it: batched with left padding, or static cache + compiled."""

    def __init__(self, folder, device: str, dtype: str, compiled: bool):
        from aitextgen_batch.models import load_model

        self.device, self.compiled = device, compiled
        self.model, self.tok = load_model(str(folder), device=device, dtype=dtype, attn_implementation="sdpa")
        self.tok.padding_side = "left"
        self.width = 0

    def kwargs(self, w: dict) -> dict:
        kw = dict(
            do_sample=w["temperature"] > 0,
            temperature=w["temperature"] or None,
            top_k=w["top_k"],
            max_new_tokens=w["max_new_tokens"],
            min_new_tokens=w.get("min_new_tokens", 0),
            pad_token_id=self.tok.pad_token_id,
        )
        if w.get("stop"):
            kw.update(stop_strings=w["stop"], tokenizer=self.tok)
        if self.compiled:
            from transformers import CompileConfig

            cc = CompileConfig(mode="reduce-overhead" if self.device.startswith("cuda") else "default")
            cc._compile_all_devices = True  # HF compiles on CUDA only unless told to
            kw.update(cache_implementation="static", compile_config=cc)
        return kw

    def run(self, prompts, w: dict, batch_size: int) -> int:
        import torch

        torch.manual_seed(0)
        tokens, eos = 0, self.tok.eos_token_id
        pad = dict(padding="max_length", max_length=self.width) if self.compiled else dict(padding=True)
        for s in range(0, len(prompts), batch_size):
            enc = self.tok(prompts[s : s + batch_size], return_tensors="pt", add_special_tokens=False, **pad)
            enc = enc.to(self.device)
            out = self.model.generate(**enc, **self.kwargs(w))
            new = out[:, enc["input_ids"].shape[1] :]
            done = (new == self.tok.pad_token_id) | (new == eos)
            tokens += int((~done).sum()) + int(done.any(dim=1).sum())  # up to and including each row's end
        sync(self.device)
        return tokens


def timed(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def hf_row(hf: HF, prompts, w: dict, batch_size: int, label: str):
    hf.width = max(len(hf.tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    warm = timed(lambda: hf.run(prompts[:batch_size], w, batch_size))[1]
    tokens, secs = timed(lambda: hf.run(prompts, w, batch_size))
    return label, tokens, secs, warm


def engine_row(engine, prompts, w: dict, label: str, refill: bool = True):
    """Time the engine on `prompts`, and check three rows replayed alone give the same text."""
    from aitextgen_batch.generation import SamplingParams, derive_seed

    keys = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "stop", "json_schema")
    params = SamplingParams(**{k: w[k] for k in keys if k in w})
    seeds = [derive_seed(0, i) for i in range(len(prompts))]
    engine.refill = refill
    warm = engine.stats["warmup_seconds"]
    t0 = time.perf_counter()
    engine.generate(prompts[: engine.slots], seeds[: engine.slots], params, batch_size=len(prompts))
    warm = time.perf_counter() - t0
    sync(str(engine.device))
    t0 = time.perf_counter()
    results = engine.generate(prompts, seeds, params, batch_size=len(prompts))
    sync(str(engine.device))
    secs = time.perf_counter() - t0
    solo = all(
        engine.generate([prompts[i]], [seeds[i]], params, 1)[0].text == results[i].text
        for i in (0, len(prompts) // 2, len(prompts) - 1)
    )
    return (label, sum(r.num_generated_tokens for r in results), secs, warm), solo, results


def table(title: str, rows) -> dict[str, float]:
    rate = {name: tokens / secs for name, tokens, secs, _ in rows}
    ref = max((n for n in rate if n.startswith("engine")), key=rate.get)
    print(f"\n{title}")
    print(
        f"| {'method':<46} | {'tokens':>7} | {'seconds':>8} | {'tok/s':>7} | {'best engine/x':>13} | {'warm-up s':>9} |"
    )
    print(f"|{'-' * 48}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 15}|{'-' * 11}|")
    for name, tokens, secs, warm in rows:
        print(
            f"| {name:<46} | {tokens:>7} | {secs:>8.2f} | {tokens / secs:>7.1f} | {rate[ref] / rate[name]:>13.2f} "
            f"| {warm:>9.2f} |"
        )
    return rate


def best(rate: dict[str, float], prefix: str) -> float:
    return max(v for k, v in rate.items() if k.startswith(prefix))


def chat_workload(args, folder, tok, threads: int) -> dict[str, float]:
    import torch

    from aitextgen_batch.generation import Engine

    torch.set_num_threads(threads)
    prompts = chat_prompts(tok, args.copies, SYSTEM)
    w = dict(max_new_tokens=args.max_new_tokens, temperature=0.7, top_k=50)
    rows = []
    hf = HF(folder, args.device, args.dtype, False)
    for bs in args.hf_batch:
        rows.append(hf_row(hf, prompts, w, bs, f"HF generate, batches of {bs}"))
    del hf
    if args.compiled:
        bs = max(args.hf_batch)
        rows.append(hf_row(HF(folder, args.device, args.dtype, True), prompts, w, bs, f"HF static + compiled, {bs}"))
    engine = Engine.from_pretrained(str(folder), device=args.device, dtype=args.dtype, slots=args.slots)
    solo = {}
    for refill in (False, True):
        row, solo[refill], _ = engine_row(
            engine, prompts, w, f"engine, {engine.slots} slots, {'refill' if refill else 'no refill'}", refill
        )
        rows.append(row)
    rate = table(
        f"chat: {len(prompts)} requests, max_new_tokens {w['max_new_tokens']}, T 0.7, top-k 50, "
        f"device {args.device}, {threads} thread(s)",
        rows,
    )
    print(f"engine rows replayed alone byte-identical: {all(solo.values())}")
    return rate


def early_workload(args, folder, tok, threads: int) -> dict[str, float]:
    import torch

    from aitextgen_batch.generation import Engine

    torch.set_num_threads(threads)
    prompts = chat_prompts(tok, args.copies, SHORT, kinds=("question",))
    rows, texts = [], {}
    engine = Engine.from_pretrained(str(folder), device=args.device, dtype=args.dtype, slots=args.slots)
    hf = HF(folder, args.device, args.dtype, False)
    for limit in (64, 1024):
        w = dict(max_new_tokens=limit, temperature=0.7, top_k=50)
        row, _, results = engine_row(engine, prompts, w, f"engine, {engine.slots} slots, max_new_tokens {limit}")
        rows.append(row)
        texts[limit] = [r.text for r in results]
        ended = sum(r.finish_reason == "eos" for r in results)
        print(f"max_new_tokens {limit}: {ended} of {len(results)} rows end at eos", flush=True)
        for bs in args.hf_batch:
            rows.append(hf_row(hf, prompts, w, bs, f"HF generate, batches of {bs}, max_new_tokens {limit}"))
    rate = table(
        f"early finish: {len(prompts)} questions ({SHORT!r}), T 0.7, top-k 50, device {args.device}, "
        f"{threads} thread(s)",
        rows,
    )
    same = sum(a == b for a, b in zip(texts[64], texts[1024], strict=True))
    print(f"rows with the same text at max_new_tokens 64 and 1024: {same} of {len(prompts)}")
    return rate


QUIZ_SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "answer": {"type": "string"},
        "difficulty": {"enum": ["easy", "medium", "hard"]},
    },
    "required": ["question", "answer", "difficulty"],
    "additionalProperties": False,
}
QUIZ_TOPICS = (
    "the moon, bees, rain, volcanoes, the ocean, trees, music, bread, rivers, deserts, the sun, cats, chess, glass, "
    "clouds, maps, salt, bridges, honey, snow, coffee, paper, stars, wolves, rice, wind, gold, ice, birds, bicycles, "
    "tea, mountains"
).split(", ")


def constrained_workload(args, folder, tok, threads: int) -> tuple[float, float]:
    """(constrained/unconstrained tokens per second, share of constrained rows that are valid)."""
    import json

    import torch

    from aitextgen_batch.generation import Engine

    torch.set_num_threads(threads)
    one = [
        tok.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": f"Write one quiz question about {t} with its answer and difficulty, as JSON.",
                }
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        for t in QUIZ_TOPICS
    ]
    prompts = one * 8
    engine = Engine.from_pretrained(str(folder), device=args.device, dtype=args.dtype, slots=args.slots)
    w = dict(max_new_tokens=96, temperature=0.7, top_k=50)
    rows = []
    row, _, _ = engine_row(engine, prompts, w, f"engine, {engine.slots} slots, unconstrained")
    rows.append(row)
    row, solo, results = engine_row(
        engine, prompts, {**w, "json_schema": json.dumps(QUIZ_SCHEMA)}, f"engine, {engine.slots} slots, JSON Schema"
    )
    rows.append(row)
    rate = table(f"constrained: {len(prompts)} JSON requests, device {args.device}, {threads} thread(s)", rows)
    valid = sum(bool(r.valid) for r in results) / len(results)
    ended = sum(r.finish_reason == "eos" for r in results)
    print(f"JSON rows valid: {valid:.0%} ({ended} ended at eos); replayed alone byte-identical: {solo}")
    return rate[rows[1][0]] / rate[rows[0][0]], valid


def toy_workloads(args, threads: int) -> tuple[float, float]:
    """The workloads earlier releases were measured on: (engine/hf_batched, refill/no_refill)."""
    import pyarrow.parquet as pq
    import torch

    from aitextgen_batch.generation import Engine
    from aitextgen_batch.models.default import SMALL_MODEL
    from aitextgen_batch.samples import SAMPLE_PROMPTS
    from aitextgen_batch.tokenizer import init_model, train_tokenizer

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        from pydoc_data.topics import topics

        corpus = Path(d) / "topics.txt"
        corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)))
        train_tokenizer([corpus], vocab_size=8000, output=Path(d) / "tok")
        folder = init_model("small", Path(d) / "tok", Path(d) / "model", seed=0)
        words = corpus.read_text().split()
        rng = random.Random(0)
        prompts = [" ".join(words[(s := rng.randrange(len(words) - 80)) : s + rng.randint(3, 60)]) for _ in range(256)]
        w = dict(max_new_tokens=64, min_new_tokens=64, temperature=0.7, top_k=50)
        rows = [hf_row(HF(folder, args.device, args.dtype, False), prompts, w, 32, "HF generate, batches of 32")]
        engine = Engine.from_pretrained(str(folder), device=args.device, dtype=args.dtype, slots=32)
        rows.append(engine_row(engine, prompts, w, "engine, 32 slots")[0])
        fixed = table(f"toy 1: random `small` preset, exactly 64 new tokens, {threads} thread(s)", rows)
    prompts = pq.read_table(SAMPLE_PROMPTS, columns=["prompt"]).column("prompt").to_pylist()[:256]
    w = dict(max_new_tokens=192, temperature=0.7, top_k=50, stop=["\n\n"])
    rows = [hf_row(HF(SMALL_MODEL, args.device, args.dtype, False), prompts, w, 32, "HF generate, batches of 32")]
    engine = Engine.from_pretrained(str(SMALL_MODEL), device=args.device, dtype=args.dtype, slots=32)
    rows.append(engine_row(engine, prompts, w, "engine, 32 slots, no refill", refill=False)[0])
    rows.append(engine_row(engine, prompts, w, "engine, 32 slots, refill")[0])
    early = table(f'toy 2: pydoc-gpt2, stop "\\n\\n", 192 new tokens, {threads} thread(s)', rows)
    return fixed["engine, 32 slots"] / best(fixed, "HF"), early[rows[-1][0]] / early[rows[-2][0]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model folder (default: the default model, SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU threads; each gets a table")
    ap.add_argument("--copies", type=int, default=4, help="copies of the request set (each with its own seeds)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=None, help="engine slots (default: the engine's for this model)")
    ap.add_argument("--hf-batch", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--compiled", action="store_true", help="add HF static cache + torch.compile (slow to compile)")
    ap.add_argument("--skip-early", action="store_true", help="skip the early-finish workload")
    ap.add_argument("--toy", action="store_true", help="add the pydoc-gpt2 and preset workloads")
    ap.add_argument("--constrained", action="store_true", help="add the structured-output (JSON Schema) workload")
    ap.add_argument("--only-constrained", action="store_true", help="run the structured-output workload alone")
    args = ap.parse_args()

    from aitextgen_batch.models.loading import default_dtype_name, load_tokenizer, quiet_transformers, resolve_source

    quiet_transformers()
    args.dtype = args.dtype or default_dtype_name(args.device)
    folder = resolve_source(args.model).folder
    tok = load_tokenizer(folder)
    print(f"model {folder}, device {args.device}, dtype {args.dtype}, load {os.getloadavg()[0]:.2f} at start")
    summary = []
    for threads in args.threads if not args.only_constrained else []:
        chat = chat_workload(args, folder, tok, threads)
        summary.append(f"chat {threads} thread(s): engine/hf_batched={best(chat, 'engine') / best(chat, 'HF'):.2f}")
        if not args.skip_early:
            e = early_workload(args, folder, tok, threads)
            eng = {k: e[[n for n in e if n.startswith("engine") and n.endswith(f" {k}")][0]] for k in (64, 1024)}
            hf = {k: max(v for n, v in e.items() if n.startswith("HF") and n.endswith(f" {k}")) for k in (64, 1024)}
            summary.append(
                f"early {threads} thread(s): engine@1024/engine@64={eng[1024] / eng[64]:.2f} "
                f"engine/hf_batched@64={eng[64] / hf[64]:.2f} engine/hf_batched@1024={eng[1024] / hf[1024]:.2f}"
            )
    if args.constrained or args.only_constrained:
        ratio, valid = constrained_workload(args, folder, tok, max(args.threads))
        summary.append(
            f"constrained {max(args.threads)} thread(s): constrained/unconstrained={ratio:.2f} valid={valid:.0%}"
        )
    if args.toy:
        fixed, refill = toy_workloads(args, max(args.threads))
        summary.append(f"toy: engine/hf_batched={fixed:.2f} refill/no_refill={refill:.2f}")
    print(f"\nload {os.getloadavg()[0]:.2f} at the end")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
