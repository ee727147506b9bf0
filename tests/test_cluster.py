"""Cluster configs stay runnable, and jobs submitted to a real Ray head succeed.

Config checks: every YAML, shell script and README command under `cluster/` that runs a job entrypoint
(`python jobs/NAME.py`, `python -m aitextgen_batch CMD`, `aitextgen-batch CMD`) names a file that exists, and its
arguments parse with the project's own CLI parser; the cluster-launcher YAML passes Ray's schema; the KubeRay
manifests ask for GPUs, keep token auth on, and install what pyproject.toml requires.

Real head: `cluster/local-head.sh` starts a head (its own temp dir, ports, HOME and token) in a session of its own,
separate from the in-process Ray other tests use. `ray stop` would kill every Ray process on the machine, so the head
is stopped by signalling the processes of its session only.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from aitextgen_batch.submit import (
    SubmitConfig,
    auth_headers,
    entrypoint,
    relative_paths,
    runtime_env,
    split_submit_argv,
)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
VENV_BIN = Path(sys.executable).parent


# --- configs ---------------------------------------------------------------------------------------------------


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


COMMAND_START = re.compile(r"^(\w+=\S*\s+)*(aitextgen-batch|python\S*|ray job submit)\s")


def _command_lines(path: Path) -> list[str]:
    """The shell lines of a config: YAML string values, a script, a README's fenced code blocks; plus comment
    lines that start with a command (the usage notes at the top of each file)."""
    text = path.read_text()
    code: list[str] = []
    if path.suffix in (".yaml", ".yml"):
        code = [s for doc in _yaml_docs(path) for s in _strings(doc)]
    elif path.suffix == ".md":
        if path.parent == REPO:  # the top-level README: its "Running on a cluster" section
            section = re.search(r"^## Running on a cluster\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
            text = section.group(1) if section else ""
        code = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S)
    else:
        code = [text]
    lines = [line for block in code for line in block.replace("\\\n", " ").splitlines()]
    comments = [m.strip() for m in re.findall(r"^\s*#+(.*)$", text.replace("\\\n#", " "), flags=re.M)]
    return [x for x in lines if not x.lstrip().startswith("#")] + [c for c in comments if COMMAND_START.match(c)]


def _entrypoints(lines: list[str]) -> list[list[str]]:
    """Each command that runs this project: [how, name, *args], how being `jobs`, `module` or `cli`."""
    found = []
    for line in lines:
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            for i, w in enumerate(words):
                rest = words[i + 1 :]
                if w.startswith("python") and rest[:1] and re.fullmatch(r"(\./)?jobs/\w+\.py", rest[0]):
                    found.append(["jobs", Path(rest[0]).stem, *rest[1:]])
                elif w.startswith("python") and rest[:2] == ["-m", "aitextgen_batch"] and rest[2:]:
                    found.append(["module", *rest[2:]])
                elif w == "aitextgen-batch" and rest:
                    found.append(["cli", *rest])
    return found


def _config_files() -> list[Path]:
    return [*sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml", ".sh", ".md")), REPO / "README.md"]


def _check_parses(argv: list[str], where: str) -> None:
    """argv parses with the project's own parser (a `submit` on both sides of its `--`)."""
    from aitextgen_batch.cli import build_parser, parse
    from aitextgen_batch.config import config_from_namespace

    try:
        if argv[0] == "submit":
            own, job = split_submit_argv(argv[1:])
            config_from_namespace(SubmitConfig, build_parser().parse_args(["submit", *own]))
            if job:
                _check_parses(job, where)
            return
        parse(argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `{shlex.join(argv)}` does not parse (exit {exc.code}); see stderr above")


def test_cluster_folder_has_every_recipe():
    names = {p.name for p in _config_files() if p.parent != REPO}
    assert {"local-head.sh", "README.md"} <= names
    kinds = {doc.get("kind") for p in CLUSTER.rglob("*.yaml") for doc in _yaml_docs(p)}
    assert {"RayCluster", "RayJob"} <= kinds
    assert any("available_node_types" in doc for p in CLUSTER.rglob("*.yaml") for doc in _yaml_docs(p))


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_entrypoints_exist_and_parse(path, monkeypatch):
    monkeypatch.chdir(REPO)  # `--working-dir .` in a documented command means the repository root
    where = str(path.relative_to(REPO))
    for how, name, *args in _entrypoints(_command_lines(path)):
        bad = [a for a in args if re.search(r"<[^>]*>|\bCHANGE", a)]
        assert not bad, f"{where}: placeholder arguments {bad}: use real-looking paths so they can be checked"
        argv = [name, *args]
        if how == "jobs":
            job = REPO / "jobs" / f"{name}.py"
            assert job.is_file(), f"{where} runs jobs/{name}.py, which does not exist"
            command = re.search(r'main\(\["([\w-]+)"', job.read_text())
            if not command:
                continue
            argv = [command.group(1), *args]  # a thin entrypoint for one command: its arguments are that command's
        _check_parses(argv, where)


def test_every_kuberay_job_and_launcher_config_names_a_checked_entrypoint():
    for path in CLUSTER.rglob("*.yaml"):
        for doc in _yaml_docs(path):
            if doc.get("kind") == "RayJob":
                assert _entrypoints([doc["spec"]["entrypoint"]]), f"{path.name}: entrypoint runs no project command"


def _names(requirements) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r.strip(), maxsplit=1)[0].lower() for r in requirements if r.strip()}


def _cluster_requirements() -> set[str]:
    lines = (line.split("#", 1)[0] for line in (CLUSTER / "requirements.txt").read_text().splitlines())
    return _names(lines)


def test_cluster_requirements_are_pyprojects_minus_ray():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert _cluster_requirements() == _names(deps) - {"ray"}


def test_kuberay_manifests_gpu_token_auth_and_packages():
    import ray

    required = _cluster_requirements()  # the image brings Ray itself
    for path in CLUSTER.rglob("*.yaml"):
        for doc in _yaml_docs(path):
            if doc.get("kind") not in ("RayCluster", "RayJob"):
                continue
            spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            where = f"{path.name} ({doc['kind']} {doc['metadata']['name']})"
            version = str(spec["rayVersion"])
            assert tuple(map(int, version.split(".")[:2])) >= (2, 52), f"{where}: token auth needs Ray >= 2.52"
            assert version.split(".")[:2] == ray.__version__.split(".")[:2], f"{where}: Ray {version} vs client"
            assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: keep token auth on"
            groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
            for group in groups:
                params = group.get("rayStartParams", {})
                assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams must be strings"
                for c in group["template"]["spec"]["containers"]:
                    assert c["image"].split(":")[1].startswith(version), f"{where}: image {c['image']} vs {version}"
            gpus = [
                c["resources"]["limits"].get("nvidia.com/gpu")
                for g in spec["workerGroupSpecs"]
                for c in g["template"]["spec"]["containers"]
            ]
            assert all(gpus), f"{where}: every worker group asks for nvidia.com/gpu"
            if doc["kind"] == "RayJob":
                env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
                pip = _names(env["pip"])
                assert pip == required, f"{where}: runtimeEnvYAML pip is not cluster/requirements.txt: {pip ^ required}"
                assert "working_dir" in env, f"{where}: the job needs the package's code (working_dir)"


def test_launcher_config_passes_ray_schema():
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    configs = [(p, d) for p in CLUSTER.rglob("*.yaml") for d in _yaml_docs(p) if "available_node_types" in d]
    assert configs
    for path, config in configs:
        try:
            validate_config(prepare_config(config))
        except jsonschema.ValidationError as exc:
            raise AssertionError(f"{path.name}: {exc.message}") from None
        starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]]
        for cmd in (c for c in starts if "ray start" in c):
            assert "RAY_AUTH_MODE=token" in cmd, f"{path.name}: `{cmd}` would start Ray without token auth"
        gpu_groups = [t for t in config["available_node_types"].values() if t.get("resources", {}).get("GPU")]
        assert gpu_groups, f"{path.name}: no GPU worker group"


# --- submit, without a cluster ---------------------------------------------------------------------------------


def test_split_submit_argv():
    assert split_submit_argv(["--address", "http://h:8265", "--", "generate", "--x", "--", "y"]) == (
        ["--address", "http://h:8265"],
        ["generate", "--x", "--", "y"],
    )
    assert split_submit_argv(["--status", "raysubmit_1"]) == (["--status", "raysubmit_1"], [])


def test_entrypoint_and_runtime_env(tmp_path):
    reqs = tmp_path / "reqs.txt"
    reqs.write_text("# deps\ntorch>=2.6  # the CUDA build\n\nrich\n")
    cfg = SubmitConfig(
        working_dir=str(tmp_path), env=["HF_HUB_OFFLINE=1", "A=b=c"], pip=[str(reqs), "x"], exclude=["/data"]
    )
    assert entrypoint(cfg, ["generate", "--prompt-column", "my text"]) == (
        "python -m aitextgen_batch generate --prompt-column 'my text'"
    )
    env = runtime_env(cfg)
    assert env["working_dir"] == str(tmp_path) and {".git", "/.venv", "__pycache__", "/data"} <= set(env["excludes"])
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "1", "A": "b=c"} and env["pip"] == ["torch>=2.6", "rich", "x"]
    assert runtime_env(SubmitConfig(working_dir=None)) == {}


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"address": "127.0.0.1:6379"}, "--address"),
        ({"working_dir": "/no/such/folder"}, "--working-dir"),
        ({"env": ["NOVALUE"]}, "--env"),
        ({"status": "a", "stop": "b"}, "--status"),
        ({"job_id": "team/run-1"}, "--job-id"),
        ({"job_id": ""}, "--job-id"),
    ],
)
def test_submit_config_names_the_bad_flag(kwargs, flag):
    from aitextgen_batch.errors import UserError

    with pytest.raises(UserError, match=flag):
        SubmitConfig(**kwargs)


def test_auth_token_sources_in_rays_order(tmp_path, monkeypatch):
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_headers() == ({}, None)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("fromhome\n")
    assert auth_headers()[0] == {"Authorization": "Bearer fromhome"}
    (tmp_path / "tok").write_text("frompath")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert auth_headers()[0] == {"Authorization": "Bearer frompath"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert auth_headers() == ({"Authorization": "Bearer fromenv"}, "RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_headers() == ({}, None)


def _cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`aitextgen-batch ARGS` in a subprocess, run from the repository root (so `--working-dir .` is the repo)."""
    return subprocess.run(
        [sys.executable, "-m", "aitextgen_batch", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_readme_says_how_to_activate_right_after_setup():
    """`make demo`/`make test` install into .venv: the README must say how to get its commands on PATH at once."""
    text = (REPO / "README.md").read_text()
    setup = text.index("make test")
    activate = text.find("source .venv/bin/activate")
    assert 0 < activate and activate - setup < 800 and text.index("## Usage") > activate


def test_local_head_script_finds_the_project_environment():
    script = (CLUSTER / "local-head.sh").read_text()
    assert '"$REPO/.venv/bin/ray"' in script and "make venv" in script


def test_relative_data_paths_are_flagged():
    cmd = ["generate", "--model", "gpt2", "--input", "prompts/", "--output", "/data/out", "--dataset", "s3://b/c"]
    assert relative_paths(cmd) == ["--input prompts/"]


def test_submit_to_an_http_server_that_is_not_ray_is_one_line(tmp_path):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        for args in (["--status", "x"], ["--job-id", "a/b", "--", "info", "m"]):
            r = _cli("submit", "--address", url, *args, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
            assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") <= 3, r.stderr
        assert f"the server at {url} is not a Ray dashboard" in _cli("submit", "--address", url, "--status", "x").stderr
    finally:
        server.shutdown()


def test_submit_refuses_a_bad_job_flag_before_connecting():
    r = _cli("submit", "--address", "http://127.0.0.1:9", "--", "generate", "--input", "p.parquet")
    assert r.returncode == 2 and "--output" in r.stderr and "Ray" not in r.stderr


# --- a real head -----------------------------------------------------------------------------------------------


@dataclass
class Head:
    url: str
    env: dict[str, str]  # the environment of a client on this machine: its HOME holds the head's token
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid`: the head's `ray start` and everything Ray started from it."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop_session(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM every process of the head's session (after a job, `ray start --block` alone may not pass it on in
    time), then SIGKILL whatever is left after `grace` seconds."""
    sid = proc.pid  # start_new_session: the head leads its own session
    _signal(_session_pids(sid), signal.SIGTERM)
    deadline = time.time() + grace
    while _session_pids(sid) and time.time() < deadline:
        time.sleep(0.2)
    _signal(_session_pids(sid), signal.SIGKILL)
    proc.wait(timeout=10)


def _wait_ready(url: str, token_file: Path, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the head exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if token_file.is_file():
            req = urllib.request.Request(
                f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token_file.read_text()}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        time.sleep(0.5)
    raise AssertionError(f"the head's job API did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head from cluster/local-head.sh: 3 CPUs (the jobs of `head_jobs` run at once: one CPU each), loopback
    dashboard, token auth with its own token."""
    if not sys.platform.startswith("linux"):
        pytest.skip("stopping the head by its session needs /proc")
    root = tmp_path_factory.mktemp("head")
    home = root / "home"
    home.mkdir()
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The project's environment is not on PATH (not activated), as for a new user: the script finds .venv itself.
    path = [d for d in env.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() != VENV_BIN.resolve()]
    env.update(
        HOME=str(home),
        PATH=os.pathsep.join(path),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25",  # the finetune job's controller notices its workers sooner
        PYTHONUNBUFFERED="1",
    )
    ports = ["--port", "--dashboard-port", "--node-manager-port", "--object-manager-port", "--ray-client-server-port"]
    ports += ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    ports += ["--metrics-export-port"]
    chosen = {flag: _free_port() for flag in ports}
    argv = ["bash", str(CLUSTER / "local-head.sh"), "--block", "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    argv += [x for flag, port in chosen.items() for x in (flag, str(port))]
    log = root / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv, env={**env, "NUM_CPUS": "3"}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=root
        )
    try:
        url = f"http://127.0.0.1:{chosen['--dashboard-port']}"
        _wait_ready(url, home / ".ray" / "auth_token", proc, log)
        yield Head(url=url, env=env, log=log)
    finally:
        _stop_session(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _write_prompts(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["The quick brown fox", "Seven wizards", "Music plays in the garden", "Old river", "A lazy dog", "Stars"]
    pq.write_table(pa.table({"id": [f"row-{i}" for i in range(len(texts))], "prompt": texts}), path)
    return path


@pytest.fixture
def prompts(tmp_path):
    return _write_prompts(tmp_path / "prompts.parquet")


def _generate(model, prompts, out) -> list[str]:
    return ["generate", "--model", str(model), "--input", str(prompts), "--output", str(out)] + [
        "--max-new-tokens", "4", "--shard-rows", "3", "--num-actors", "1", "--quiet",
    ]  # fmt: skip


def _result_ids(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    return sorted(pq.read_table(str(out)).column("id").to_pylist())


def _explain(r: subprocess.CompletedProcess, head: Head) -> str:
    head_log = head.log.read_text()[-1500:]
    return f"exit {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}\nhead:\n{head_log}"


@pytest.fixture(scope="module")
def head_jobs(ray_head, tiny_model_dir, corpus_file, tmp_path_factory) -> dict:
    """A generate job submitted each documented way and a finetune job, all at once (one CPU each on the head, and
    their start-ups overlap): name -> (the client's CompletedProcess, the job's output folder)."""
    from aitextgen_batch.cli import main

    root = tmp_path_factory.mktemp("jobs")
    prompts = _write_prompts(root / "prompts.parquet")
    outs = {"submit": root / "submit-results", "plain": root / "plain-results", "finetune": root / "finetuned"}
    cache = root / "cache"
    assert main(["prepare", "--input", str(corpus_file), "--tokenizer", str(tiny_model_dir), "--output", str(cache),
                 "--num-shards", "2"]) == 0  # fmt: skip
    submit = [sys.executable, "-m", "aitextgen_batch", "submit", "--address", ray_head.url]
    ours = [*submit, "--env", "HF_HUB_OFFLINE=1", "--", *_generate(tiny_model_dir, prompts, outs["submit"])]
    # The documented path without our CLI; Ray's client sends the token only with RAY_AUTH_MODE=token.
    plain = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.url, "--working-dir", "."]
    plain += ["--", "python", "jobs/generate.py", *_generate(tiny_model_dir, prompts, outs["plain"])[1:]]
    finetune = [
        *submit, "--",
        "finetune", "--model", str(tiny_model_dir), "--dataset", str(cache), "--output", str(outs["finetune"]),
        "--num-workers", "1", "--threads", "1", "--max-steps", "4", "--batch-size", "2", "--block-size", "16",
        "--save-every", "4", "--generate-every", "0", "--quiet",
    ]  # fmt: skip
    envs = {"plain": {**ray_head.env, "RAY_AUTH_MODE": "token"}}
    procs = {
        name: subprocess.Popen(
            argv, cwd=REPO, env=envs.get(name, ray_head.env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, argv in (("submit", ours), ("plain", plain), ("finetune", finetune))
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), outs[name])
    return results


@pytest.mark.slow
def test_submit_generate_job(head_jobs, ray_head):
    r, out = head_jobs["submit"]
    assert r.returncode == 0, _explain(r, ray_head)
    assert "SUCCEEDED" in r.stderr and "python -m aitextgen_batch generate" in r.stderr
    assert r.stdout.count("generation summary") == 1  # the job's whole log, once (the stream ends with the job)
    assert _result_ids(out) == [f"row-{i}" for i in range(6)]


@pytest.mark.slow
def test_plain_ray_job_submit_of_jobs_generate(head_jobs, ray_head):
    """The documented path without our CLI (`ray job submit ... python jobs/generate.py`)."""
    r, out = head_jobs["plain"]
    assert r.returncode == 0, _explain(r, ray_head)
    assert _result_ids(out) == [f"row-{i}" for i in range(6)]


@pytest.mark.slow
def test_submit_no_wait_status_and_stop(ray_head, tiny_model_dir, prompts, tmp_path):
    env = ray_head.env
    r = _cli(
        "submit", "--address", ray_head.url, "--no-wait", "--job-id", "aitextgen-stop-me", "--",
        *_generate(tiny_model_dir, prompts, tmp_path / "results"), env=env,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "aitextgen-stop-me", _explain(r, ray_head)
    r = _cli("submit", "--address", ray_head.url, "--status", "aitextgen-stop-me", env=env)
    assert r.returncode == 0 and re.search(r"aitextgen-stop-me: (PENDING|RUNNING)", r.stderr), _explain(r, ray_head)
    r = _cli("submit", "--address", ray_head.url, "--stop", "aitextgen-stop-me", env=env)
    assert r.returncode == 0 and "aitextgen-stop-me: STOPPED" in r.stderr, _explain(r, ray_head)
    r = _cli("submit", "--address", ray_head.url, "--status", "aitextgen-stop-me", env=env)
    assert r.returncode == 1 and "STOPPED" in r.stderr
    r = _cli("submit", "--address", ray_head.url, "--status", "raysubmit_nosuchjob", env=env)
    assert r.returncode == 2 and "nosuchjob" in r.stderr
    # a job id already taken is refused before anything is uploaded, in one line
    r = _cli(
        "submit", "--address", ray_head.url, "--no-wait", "--job-id", "aitextgen-stop-me", "--",
        *_generate(tiny_model_dir, prompts, tmp_path / "again"), env=env,
    )  # fmt: skip
    assert r.returncode == 2 and "--job-id 'aitextgen-stop-me' is taken" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_submit_with_a_wrong_token_is_refused(ray_head):
    r = _cli("submit", "--address", ray_head.url, "--status", "x", env={**ray_head.env, "RAY_AUTH_TOKEN": "wrong"})
    assert r.returncode == 2 and "refused the token from RAY_AUTH_TOKEN" in r.stderr, r.stderr


@pytest.mark.slow
def test_submit_finetune_job(head_jobs, ray_head):
    r, out = head_jobs["finetune"]
    assert r.returncode == 0, _explain(r, ray_head)
    assert "SUCCEEDED" in r.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    steps = [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]
