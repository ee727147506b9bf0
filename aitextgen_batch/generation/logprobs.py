"""Prompt log-probabilities (`prompt_logprobs`): each prompt token's log-probability under the model."""

from __future__ import annotations

from .work import WorkItem


def prompt_logprobs(engine, work: list[WorkItem]) -> None:
    """Each prompt token's log-probability under the model, for the items that ask: a plain forward pass (no
    cache) of `prefill_rows` x bucket, the prefill's fixed shape, so a row's numbers never depend on its
    neighbours; each item's prompt once, whatever its samples."""
    import torch

    from .kvcache import prefill_masks

    seen: dict[int, list] = {}
    by_bucket: dict[int, list[WorkItem]] = {}
    for w in work:
        if id(w.prompt_ids) not in seen:
            seen[id(w.prompt_ids)] = []
            by_bucket.setdefault(w.bucket, []).append(w)
        seen[id(w.prompt_ids)].append(w)
    for width, group in by_bucket.items():
        for s in range(0, len(group), engine.prefill_rows):
            part = group[s : s + engine.prefill_rows]
            ids = torch.full((engine.prefill_rows, width), engine.pad_id, dtype=torch.int64)
            pos = torch.zeros((engine.prefill_rows, width), dtype=torch.int64)
            start = torch.full((engine.prefill_rows,), width - 1, dtype=torch.int64)
            for r, w in enumerate(part):
                n = len(w.prompt_ids)
                ids[r, width - n :] = torch.tensor(w.prompt_ids)
                pos[r, width - n :] = torch.arange(n)
                start[r] = width - n
            ids, pos, start = ids.to(engine.device), pos.to(engine.device), start.to(engine.device)
            masks = prefill_masks(engine._runner.kinds, start, width, engine.dtype)
            logits = engine.model(input_ids=ids, attention_mask=masks, position_ids=pos, use_cache=False).logits
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None])[..., 0].cpu()
            for r, w in enumerate(part):
                n = len(w.prompt_ids)
                values = [None] + lp[r, width - n :].tolist()
                for same in seen[id(w.prompt_ids)]:
                    same.result.prompt_logprobs = values
