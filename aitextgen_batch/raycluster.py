"""Join or start Ray for a job's driver (`generate`, `finetune`): one rule, and never an unbounded wait.

Which cluster: `--address` when given, else `$RAY_ADDRESS` (set by `ray job submit` for the job it runs), else a new
local Ray (`address="local"`). A bare `ray.init()` would instead join whatever `/tmp/ray/ray_current_cluster` names,
and when that head died without `ray stop` (killed, OOM, a reboot that kept /tmp) it waits for it for ever.

Before joining an address, its host and port are probed with a bounded TCP connect, so a dead or wrong address is an
error naming the address and the fix instead of a hang.

A local Ray started for one command has no dashboard: nothing in the command uses it, and its dozen processes slow
the start on a small machine. For a cluster with a dashboard and job API, start a head (cluster/local-head.sh).
"""

from __future__ import annotations

import logging
import os
import socket

from .errors import UserError

CONNECT_TIMEOUT_S = 10.0


def ray_address(address: str | None) -> str:
    """The address a driver joins: the flag, else $RAY_ADDRESS, else `local` (start a new local Ray).

    Raises:
        UserError: a dashboard URL (`http://HOST:8265`, what `submit` and $RAY_ADDRESS for `ray job submit` take):
            a driver joins a cluster at its GCS address or through Ray Client, never through the job API.
    """
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if target.split("://", 1)[0].lower() in ("http", "https") and "://" in target:
        source = "--address" if address else "$RAY_ADDRESS"
        raise UserError(
            f"{source} {target} is a Ray dashboard URL (the job API that `aitextgen-batch submit` talks to); this "
            "command joins a cluster at its GCS address (HOST:6379) or ray://HOST:10001. Pass one of those, run the "
            f"command on the cluster with `aitextgen-batch submit --address {target} -- ...`, or leave --address "
            "and RAY_ADDRESS unset to start a local Ray"
        )
    return target


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `host:port`, `ray://host:port` or `[v6]:port`; None when the address has no port."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _resolve_auto(address: str) -> str:
    """`auto` means the head recorded in Ray's temp dir (`ray start --head` on this machine) or nothing."""
    if address != "auto":
        return address
    from ray._private.utils import read_ray_address

    found = read_ray_address()
    if not found:
        raise UserError(
            "--address auto: no Ray head was started on this machine (`ray start --head`, cluster/local-head.sh); "
            "start one, pass its address, or leave --address unset to start a local Ray"
        )
    return found


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise a UserError unless something listens at `address` (bounded by `timeout` seconds)."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as exc:
        source = "" if os.environ.get("RAY_ADDRESS") != address else " (from $RAY_ADDRESS)"
        raise UserError(
            f"no Ray cluster answers at {address}{source}: {exc.strerror or exc}. Start that cluster "
            "(`ray start --head`, cluster/local-head.sh), pass the address of a live one with --address, or leave "
            "--address and RAY_ADDRESS unset to start a local Ray"
        ) from exc


def connect_ray(address: str | None) -> bool:
    """Join the cluster `ray_address(address)` names, or start a local Ray.

    Returns:
        True when this call started or joined Ray (the caller shuts it down), False when Ray was already initialized.

    Raises:
        UserError: the address is unreachable (named, with the fix).
    """
    import ray

    target = ray_address(address)  # checked even when Ray is up already: a dashboard URL is refused in any case
    if ray.is_initialized():
        return False
    if target != "local":
        target = _resolve_auto(target)
        check_reachable(target)
    local = {"include_dashboard": False} if target == "local" else {}
    if target == "local":
        # Ray turns token auth on for a new local cluster and warns that it did; this process starts that cluster
        # itself, so the warning tells its user nothing: token auth stays on, the warning goes.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=target, logging_level=logging.WARNING, log_to_driver=True, **local)
    return True
