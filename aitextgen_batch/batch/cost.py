"""What a job cost: the devices its runs held and for how long, against the tokens it generated.

Each run of the driver is a `Session` in `_job.json`: the device type, how many devices its actors held (actors x
GPUs each, or CPU cores each for a CPU job) and devices x seconds from the actors' start (model loading included) to
their stop. It is saved as shards finish (every `SAVE_EVERY_S` at most) and at the end, so a killed run's time counts
too; a resumed job adds its sessions. `--price-per-hour USD` (per device) turns device-hours into dollars.
"""

from __future__ import annotations

import time

from .manifest import Session

SAVE_EVERY_S = 30.0


def device_type(device: str, ray_resources: dict | None = None) -> str:
    """ "cpu", or "cuda" with the accelerator type: Ray's `accelerator_type:*` resource of the cluster (when it has one
    type), or this process's GPU name (in-process)."""
    if device == "cpu":
        return "cpu"
    if ray_resources is not None:
        kinds = sorted(k.split(":", 1)[1] for k in ray_resources if k.startswith("accelerator_type:"))
        return f"cuda:{kinds[0]}" if len(kinds) == 1 else "cuda"
    import torch

    return f"cuda:{torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cuda"


class Meter:
    """Times one session's devices: from `start` (the actors are asked for) to `stop` (they are given back)."""

    def __init__(self, session: Session):
        self.session = session
        self.t0 = time.time()
        self.held_since: float | None = None
        self.saved = 0.0

    def start(self, devices: float) -> None:
        self.session.devices = devices
        self.held_since = time.time()

    def update(self) -> None:
        now = time.time()
        self.session.seconds = round(now - self.t0, 3)
        if self.held_since is not None:
            self.session.device_seconds = round(self.session.devices * (now - self.held_since), 3)

    def stop(self) -> None:
        self.update()
        self.held_since = None

    def due(self) -> bool:
        """Whether to save the session now (as shards finish, at most every `SAVE_EVERY_S`)."""
        if time.time() - self.saved < SAVE_EVERY_S:
            return False
        self.saved = time.time()
        self.update()
        return True


def summary_fields(sessions: list[Session], generated_tokens: int, price_per_hour: float | None) -> dict:
    """The cost fields of a job's summary, over all its sessions."""
    by_type: dict[str, float] = {}
    for s in sessions:
        by_type[s.device] = round(by_type.get(s.device, 0.0) + s.device_seconds, 3)
    hours = sum(by_type.values()) / 3600  # from the values reported, so that they agree
    usd = hours * price_per_hour if price_per_hour is not None else None
    return {
        "wall_seconds": round(sum(s.seconds for s in sessions), 2),
        "sessions": len(sessions),
        "device_seconds": by_type,
        "tokens_per_device_hour": round(generated_tokens / hours, 1) if hours else 0.0,
        "price_per_hour": price_per_hour,
        "cost_usd": round(usd, 6) if usd is not None else None,
        "usd_per_million_tokens": round(usd / (generated_tokens / 1e6), 6)
        if usd is not None and generated_tokens
        else None,
    }
