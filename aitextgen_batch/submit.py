"""`aitextgen-batch submit`: run a command as a Ray job on a cluster, follow its logs, exit with its status.

    aitextgen-batch submit --address http://127.0.0.1:8265 -- generate --model /data/model --input /data/prompts \
        --output /data/results
    aitextgen-batch submit --no-wait -- finetune ...      # prints the job id and returns
    aitextgen-batch submit --logs JOB_ID                  # reattach: follow a job to its end
    aitextgen-batch submit --status JOB_ID                # exit 1 if it failed or was stopped
    aitextgen-batch submit --stop JOB_ID

The job's entrypoint is `python -m aitextgen_batch COMMAND ...`, run on the head with `--working-dir` (default: the
current folder, minus virtualenvs, VCS data, caches and outputs) uploaded as its runtime env: the cluster runs the
code you have here, while model, input and output paths are the cluster's. The command after `--` is checked by the
project's own parser before anything is sent (see `cli.main`).

Token auth. Ray (2.52+) checks a bearer token on the dashboard's job API when a head runs with `RAY_AUTH_MODE=token`,
but Ray's own clients send the token only when `RAY_AUTH_MODE=token` is set on the client too; a plain
`ray job submit` is refused with 401 otherwise. `submit` sends the token whenever it finds one, in Ray's order:
`RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token` (written by
`ray get-auth-token --generate` or by a local `ray.init()`). So a head started on this machine needs nothing
exported; for a remote cluster export its token as `RAY_AUTH_TOKEN`. `RAY_AUTH_MODE=disabled` sends no token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import check
from .errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Left out of the working-dir upload (gitignore patterns; Ray also honours .gitignore and .rayignore). Outputs and
# environments are anchored at the top so that a package folder of the same name still travels.
EXCLUDES = (
    ".git",
    "/.venv",
    "/venv",
    "/env",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    "/build",
    "/dist",
    "/out",
    "/demo_out",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".ipynb_checkpoints",
)


@dataclass
class SubmitConfig:
    """Run a command as a Ray job on a cluster (`submit [options] -- generate ...`), follow it, exit with its status."""

    address: str | None = field(
        default=None,
        metadata={"help": f"dashboard URL; default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS (a URL), {DEFAULT_ADDRESS}"},
    )
    working_dir: str | None = field(
        default=".",
        metadata={"help": "folder uploaded as the job's code (or a remote zip URI); none: use the cluster's install"},
    )
    exclude: list[str] = field(
        default_factory=list, metadata={"help": "more gitignore patterns left out of the upload"}
    )
    pip: list[str] = field(
        default_factory=list, metadata={"help": "pip requirements (or a requirements .txt file) installed for the job"}
    )
    env: list[str] = field(default_factory=list, metadata={"help": "KEY=VALUE environment variables of the job"})
    python: str = field(default="python", metadata={"help": "the Python interpreter on the cluster"})
    job_id: str | None = field(default=None, metadata={"help": "the new job's id (default: Ray picks raysubmit_...)"})
    wait: bool = field(
        default=True, metadata={"help": "follow the logs to the end and exit with the job's status (else print its id)"}
    )
    status: str | None = field(
        default=None,
        metadata={"help": "print job JOB_ID's status; exit 1 if it failed or was stopped", "metavar": "JOB_ID"},
    )
    logs: str | None = field(
        default=None,
        metadata={"help": "print job JOB_ID's logs, following it to its end unless --no-wait", "metavar": "JOB_ID"},
    )
    stop: str | None = field(default=None, metadata={"help": "stop job JOB_ID", "metavar": "JOB_ID"})

    def __post_init__(self):
        for name in ("exclude", "pip", "env"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if self.address is not None:
            check("://" in self.address, "address", "must be the dashboard URL, e.g. http://HEAD:8265", self.address)
        if self.working_dir is not None and "://" not in self.working_dir:
            check(Path(self.working_dir).is_dir(), "working_dir", "must be a folder (or none)", self.working_dir)
        for item in self.env:
            check("=" in item and item.split("=", 1)[0].strip() != "", "env", "takes KEY=VALUE items", item)
        check(bool(self.python.strip()), "python", "must name the interpreter on the cluster", self.python)
        if self.job_id is not None:
            ok = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", self.job_id) is not None
            what = "must be 1 to 128 letters, digits, '_', '-', '.' or ':' (it names the job in URLs)"
            check(ok, "job_id", what, self.job_id)
        given = [name for name in ("status", "logs", "stop") if getattr(self, name)]
        check(len(given) <= 1, "status", "cannot be combined with --logs or --stop: one job action at a time", given)


def split_submit_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split `[submit options] -- COMMAND [flags]` at the first `--` into (submit options, the job's command)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def auth_headers() -> tuple[dict[str, str], str | None]:
    """The bearer-token header for the dashboard, and where its token came from (Ray's order of sources)."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return {}, None
    token, source = os.environ.get("RAY_AUTH_TOKEN", "").strip(), "RAY_AUTH_TOKEN"
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise UserError(f"RAY_AUTH_TOKEN_PATH={str(path)!r} is not a file: point it at the cluster's token file")
        token, source = path.read_text().strip(), str(path)
    if not token:
        path = Path.home() / ".ray" / "auth_token"
        if path.is_file():
            token, source = path.read_text().strip(), str(path)
    return ({"Authorization": f"Bearer {token}"}, source) if token else ({}, None)


def resolve_address(address: str | None) -> str:
    """The dashboard URL: the flag, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS when it is a URL, else local."""
    env = os.environ.get("RAY_ADDRESS", "")
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or (env if "://" in env else DEFAULT_ADDRESS)


def entrypoint(cfg: SubmitConfig, command: list[str]) -> str:
    """The shell command the job runs on the head."""
    return shlex.join([cfg.python, "-m", "aitextgen_batch", *command])


def runtime_env(cfg: SubmitConfig) -> dict:
    """The job's runtime env: the uploaded working dir, pip requirements and environment variables."""
    env: dict = {}
    if cfg.working_dir:
        remote = "://" in cfg.working_dir
        env["working_dir"] = cfg.working_dir if remote else str(Path(cfg.working_dir).resolve())
        if not remote:
            env["excludes"] = [*EXCLUDES, *cfg.exclude]
    if cfg.pip:
        env["pip"] = [req for item in cfg.pip for req in _requirements(item)]
    if cfg.env:
        env["env_vars"] = dict(item.split("=", 1) for item in cfg.env)
    return env


def _requirements(item: str) -> list[str]:
    """A requirement, or the requirements listed in a local .txt file (read here: the cluster lacks the file)."""
    if item.endswith(".txt") and Path(item).is_file():
        lines = (line.split("#", 1)[0].strip() for line in Path(item).read_text().splitlines())
        return [line for line in lines if line]
    return [item]


def relative_paths(command: list[str]) -> list[str]:
    """Data flags of `command` given relative paths: on the cluster they would resolve inside the job's copy of the
    working dir, not where the user meant."""
    flags = ("--input", "--output", "--dataset")
    return [f"{f} {v}" for f, v in zip(command, command[1:]) if f in flags and "://" not in v and not v.startswith("/")]


@contextlib.contextmanager
def _address_env_cleared():
    """Ray's client lets $RAY_ADDRESS / $RAY_API_SERVER_ADDRESS override the address it is given; ours wins."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def quiet_ray_logs() -> None:
    """Keep Ray's warnings (a package too large, ...) but not its INFO lines about each uploaded file, nor the
    warning that .git and .venv are now left out (they are left out here anyway). Process-wide: the CLI calls it."""
    import logging

    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").addFilter(
        lambda record: "ignored by default" not in record.getMessage()
    )


def connect(address: str | None):
    """A `JobSubmissionClient` for the cluster, sending the token when one is found; errors say what to fix."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    headers, source = auth_headers()
    try:
        with _address_env_cleared():
            return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as exc:
        sent = f"the token from {source}" if source else "no token (none in RAY_AUTH_TOKEN or ~/.ray/auth_token)"
        raise UserError(
            f"the Ray cluster at {url} refused {sent}: export the cluster's token as RAY_AUTH_TOKEN "
            f"(`ray get-auth-token` on its head; on KubeRay the cluster's Secret). Ray said: {str(exc).splitlines()[0]}"
        ) from None
    except ConnectionError as exc:
        raise UserError(
            f"no Ray dashboard answers at {url}: start a head (cluster/local-head.sh), or pass --address "
            f"http://HEAD:8265 (reach a remote head with `ray dashboard CLUSTER.yaml` or `kubectl port-forward`). "
            f"Ray said: {exc}"
        ) from None
    except (RuntimeError, ValueError, OSError) as exc:  # a 404 or a page that is not JSON: some other HTTP server
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"the server at {url} is not a Ray dashboard (its job API did not answer: {first}); pass the dashboard's "
            "URL with --address (http://HEAD:8265 by default)"
        ) from None


def _call(fn, *args, **kwargs):
    """Run a JobSubmissionClient request; its errors (unknown job, refused submission, lost head) become UserErrors."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise UserError(f"lost the connection to the Ray dashboard: {exc}") from None


def _exists(client, job_id: str) -> bool:
    """Whether the cluster has a job with this submission id (Ray answers 404 otherwise)."""
    try:
        client.get_job_info(job_id)
    except RuntimeError:
        return False
    return True


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _when(ms: int | None) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _report(client, job_id: str, followed: bool = False) -> int:
    """Print a job's status (and why it failed); 0 while pending, running or succeeded, 1 when failed or stopped.

    After following a job its log is on screen already, so only the first line of Ray's message is repeated.
    """
    info = _call(client.get_job_info, job_id)
    status = str(getattr(info.status, "value", info.status))
    took = f" in {(info.end_time - info.start_time) / 1000:.1f} s" if info.end_time and info.start_time else ""
    _info(f"job {job_id}: {status}{took}")
    _info(f"  entrypoint: {info.entrypoint}")
    _info(f"  started: {_when(info.start_time)}  ended: {_when(info.end_time)}")
    if info.message and status != "SUCCEEDED":
        _info(f"  message: {info.message.splitlines()[0] if followed else info.message}")
    return 1 if status in ("FAILED", "STOPPED") else 0


class _Printed:
    """How much of a job's log is on screen: the websocket's chunks and `get_job_logs` are the same text."""

    def __init__(self):
        self.chars = 0

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.chars += len(text)

    def catch_up(self, client, job_id: str) -> None:
        self.write(_call(client.get_job_logs, job_id)[self.chars :])


async def _tail(client, job_id: str, printed: _Printed) -> None:
    """Stream the log until the job ends. Ray closes the stream a few seconds after the end, so the status is polled
    beside it, and once it is terminal the rest of the log is read whole instead of waited for."""

    async def stream():
        async for chunk in client.tail_job_logs(job_id):
            printed.write(chunk)

    task = asyncio.ensure_future(stream())
    try:
        while not task.done():
            await asyncio.wait([task], timeout=0.5)
            if not task.done() and await asyncio.to_thread(_status, client, job_id) in TERMINAL:
                break
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if not task.cancelled():
        task.result()  # the stream's own error (a proxy that refuses websockets): the caller falls back to polling
    printed.catch_up(client, job_id)


def _status(client, job_id: str) -> str:
    status = _call(client.get_job_status, job_id)
    return str(getattr(status, "value", status))


def _poll(client, job_id: str, printed: _Printed) -> None:
    """Print new log text every second until the job ends (where the log websocket is unavailable)."""
    while True:
        done = _status(client, job_id) in TERMINAL
        printed.catch_up(client, job_id)
        if done:
            return
        time.sleep(1.0)


def follow(client, job_id: str, url: str) -> int:
    """Stream a job's logs to stdout until it ends, then report; Ctrl-C stops following, not the job."""
    from aiohttp import ClientError

    printed = _Printed()
    try:
        try:
            asyncio.run(_tail(client, job_id, printed))
        except (ClientError, RuntimeError, OSError) as exc:  # a proxy may refuse websockets: fall back to polling
            _info(f"(log stream unavailable: {type(exc).__name__}: {exc}; polling)")
            _poll(client, job_id, printed)
        while _status(client, job_id) not in TERMINAL:
            time.sleep(0.5)
    except KeyboardInterrupt:
        again = f"aitextgen-batch submit --address {url}"
        _info(f"\nstopped following; job {job_id} keeps running.")
        _info(f"follow it: {again} --logs {job_id}\nstop it:   {again} --stop {job_id}")
        return 130
    return _report(client, job_id, followed=True)


def run_submit(cfg: SubmitConfig, command: list[str]) -> int:
    """Submit `command` (e.g. ["generate", "--model", ...]) as a Ray job, or act on a job id; returns the exit code."""
    job = cfg.status or cfg.logs or cfg.stop
    if job and command:
        raise UserError("--status, --logs and --stop act on a job id: drop the command after `--`")
    if not job and not command:
        raise UserError(
            "nothing to run: give the command after `--`, e.g. `submit -- generate --model M --input I --output O`"
        )
    if command and (command[0] == "submit" or command[0].startswith("-")):
        raise UserError(
            f"the job's command must be an aitextgen-batch command such as generate or finetune, got {command[0]!r}"
        )
    url = resolve_address(cfg.address)
    client = connect(cfg.address)
    if cfg.status:
        return _report(client, cfg.status)
    if cfg.stop:
        stopped = _call(client.stop_job, cfg.stop)
        _info(f"job {cfg.stop}: {'stop requested' if stopped else 'had already ended'}")
        while cfg.wait and _status(client, cfg.stop) not in TERMINAL:
            time.sleep(0.5)
        _report(client, cfg.stop)
        return 0
    if cfg.logs:
        if not cfg.wait:
            sys.stdout.write(_call(client.get_job_logs, cfg.logs))
            return _report(client, cfg.logs)
        return follow(client, cfg.logs, url)

    for item in relative_paths(command):
        _info(
            f"note: {item} is relative: the job runs in a copy of the working dir, so give the cluster's absolute path"
        )
    line = entrypoint(cfg, command)
    if cfg.job_id is not None and _exists(client, cfg.job_id):
        raise UserError(
            f"--job-id {cfg.job_id!r} is taken: a job of that id exists on the cluster at {url} (see `submit --status "
            f"{cfg.job_id}`); choose another --job-id, or leave it out for a generated one"
        )
    job_id = _call(
        client.submit_job,
        entrypoint=line,
        runtime_env=runtime_env(cfg),
        submission_id=cfg.job_id,
        metadata={"aitextgen_batch_command": command[0]},
    )
    _info(f"submitted job {job_id} to {url}: {line}")
    if not cfg.wait:
        print(job_id)
        return 0
    return follow(client, job_id, url)
