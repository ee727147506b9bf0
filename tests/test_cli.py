"""The CLI: commands listed, flags generated from the config dataclasses, YAML configs, flag-naming errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aitextgen_batch.batch.api import GenerateConfig
from aitextgen_batch.cli import _commands, main, parse
from aitextgen_batch.config import _fields, _unwrap_optional, flag, load_yaml_config
from aitextgen_batch.errors import UserError

COMMANDS = (
    "train-tokenizer",
    "init-model",
    "info",
    "import-gguf",
    "default-model",
    "generate",
    "run-batch",
    "replay",
    "verify",
    "prepare",
    "submit",
    "finetune",
)


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "aitextgen_batch", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert sorted(_commands()) == sorted(COMMANDS)
    for cmd in COMMANDS:
        assert cmd in out


def _float_options() -> list[tuple[str, str]]:
    return [
        (name, f.name)
        for name, (cls, _) in _commands().items()
        for f, tp in _fields(cls)
        if _unwrap_optional(tp)[0] is float
    ]


def test_every_float_option_refuses_nan_and_infinities_on_the_command_line(capsys):
    options = _float_options()
    assert {c for c, _ in options} == {"generate", "run-batch", "replay", "finetune"} and len(options) >= 11
    for command, name in options:
        for bad in ("nan", "inf", "-inf", "NaN"):
            with pytest.raises(SystemExit) as e:
                parse([command, f"{flag(name)}={bad}"])
            assert e.value.code == 2
            assert f"argument {flag(name)}: invalid finite number value: '{bad}'" in capsys.readouterr().err


def test_every_float_option_refuses_nan_and_infinities_in_yaml(tmp_path):
    for command, name in _float_options():
        cls = _commands()[command][0]
        for bad in (".nan", ".inf", "-.inf"):
            path = tmp_path / "c.yaml"
            path.write_text(f"{name.replace('_', '-')}: {bad}\n")
            with pytest.raises(UserError, match=rf"{name} \({flag(name)}\) must be a finite number"):
                load_yaml_config(path, cls)


def test_yaml_values_are_type_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max-new-tokens: '64'\n")
    with pytest.raises(UserError, match=r"c.yaml': max_new_tokens \(--max-new-tokens\) must be an integer, got '64'"):
        load_yaml_config(path, GenerateConfig)
    path.write_text("quiet: 1\n")
    with pytest.raises(UserError, match=r"quiet \(--quiet\) must be true or false"):
        load_yaml_config(path, GenerateConfig)
    path.write_text("temperature: [1, 2\n")
    with pytest.raises(UserError, match=r"is not valid YAML"):
        load_yaml_config(path, GenerateConfig)


def test_python_api_values_are_checked_like_flags():
    from aitextgen_batch.config import build_config
    from aitextgen_batch.generation.params import SamplingParams

    with pytest.raises(UserError, match=r"top_p \(--top-p\) must be a finite number, got nan"):
        SamplingParams(top_p=float("nan"))
    with pytest.raises(UserError, match=r"temperature \(--temperature\) must be a finite number"):
        build_config(GenerateConfig, {"input": "i", "output": "o", "temperature": float("inf")})


# The flags each command requires, so that a check of one other flag is reached.
REQUIRED = {
    "train-tokenizer": ["--input", "corpus.txt"],
    "generate": ["--input", "in.parquet", "--output", "out"],
    "run-batch": ["-i", "requests.jsonl", "-o", "results.jsonl"],
    "replay": ["--prompt", "the fox", "--seed", "1"],
    "verify": ["--output", "out"],
    "prepare": ["--input", "corpus.txt", "--tokenizer", "tok", "--output", "cache"],
    "finetune": ["--dataset", "cache", "--output", "out"],
}


def _int_options() -> list[tuple[str, str]]:
    return [
        (name, f.name)
        for name, (cls, _) in _commands().items()
        for f, tp in _fields(cls)
        if _unwrap_optional(tp)[0] is int
    ]


@pytest.mark.parametrize("value", [10**30, 2**64])
def test_every_integer_option_has_an_upper_bound_checked_up_front(capsys, value):
    options = _int_options()
    assert {c for c, _ in options} == {*REQUIRED, "init-model"} - {"info", "submit"} and len(options) >= 40
    unbounded = []
    for command, name in options:
        argv = [command, *REQUIRED.get(command, []), flag(name), str(value)]
        if name == "prefill_rows":
            argv += ["--slots", "64"]
        try:
            parse(argv)
        except SystemExit as e:
            err = capsys.readouterr().err
            assert e.code == 2 and err.count("\n") <= 3 and f"{name} ({flag(name)}) must be" in err, (argv, err)
            assert f"got {value}" in err and ("<=" in err or "[0, 2**63-1]" in err), (argv, err)
            continue
        unbounded.append(f"{command} {flag(name)}")
    assert not unbounded, f"no upper bound: {unbounded}"


def test_seeds_follow_one_rule_everywhere(capsys):
    from aitextgen_batch.generation.seeds import sample_seed

    for argv in (
        ["replay", "--prompt", "p", "--seed", "-5"],
        ["replay", "--prompt", "p", "--seed", str(2**64)],
        ["generate", *REQUIRED["generate"], "--seed", str(2**63)],
        ["finetune", *REQUIRED["finetune"], "--seed", str(2**64)],
        ["init-model", "--seed", "-1"],
        ["verify", "--output", "out", "--seed", "-1"],
    ):
        with pytest.raises(SystemExit):
            parse(argv)
        assert "seed (--seed) must be an integer in [0, 2**63-1], got" in capsys.readouterr().err
    assert parse(["replay", "--prompt", "p", "--seed", str(2**63 - 1)])[1].seed == 2**63 - 1
    for bad in (-5, 2**64, 2**63):
        with pytest.raises(UserError, match=r"must be an integer in \[0, 2\*\*63-1\]"):
            sample_seed(bad, 0)


def test_invalid_value_names_flag_and_range(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["train-tokenizer", "--input", "a.txt", "--vocab-size", "10"])
    assert e.value.code == 2
    assert "vocab_size (--vocab-size) must be >= 258, got 10" in capsys.readouterr().err


def test_unknown_preset_lists_choices(capsys):
    with pytest.raises(SystemExit):
        parse(["init-model", "--preset", "huge"])
    assert "--preset) must be one of tiny, small" in capsys.readouterr().err


def test_yaml_config_and_flag_precedence(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("input: [a.txt, b.txt]\nvocab-size: 1000\nmin_frequency: 3\n")
    _, c = parse(["train-tokenizer", "--config", str(cfg), "--vocab-size", "2000"])
    assert [str(p) for p in c.input] == ["a.txt", "b.txt"]
    assert (c.vocab_size, c.min_frequency) == (2000, 3)
    cfg.write_text("vocab_sise: 10\n")
    with pytest.raises(SystemExit):
        parse(["train-tokenizer", "--config", str(cfg)])
    assert "unknown option 'vocab_sise'" in capsys.readouterr().err


def test_end_to_end_tokenizer_model_info(corpus_file, tmp_path, capsys):
    assert (
        main(
            [
                "train-tokenizer",
                "--input",
                str(corpus_file),
                "--vocab-size",
                "300",
                "--output",
                str(tmp_path / "tok"),
                "--min-frequency",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert (
        main(["init-model", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "m")])
        == 0
    )
    assert (tmp_path / "m" / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel" in out and "sha256:" in out


def test_runtime_error_is_one_clean_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing" / "x/")]) == 2
    err = capsys.readouterr().err
    assert "error: model folder" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_model_dir):
    """Files a careless user passes: a binary file, a plain file, a model folder whose config.json is not JSON,
    a token cache."""
    import shutil

    from aitextgen_batch.data import TokenDataset

    root = tmp_path_factory.mktemp("hostile")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (root / "file.txt").write_text("a file, not a folder\n")
    shutil.copytree(tiny_model_dir, root / "badconfig")
    (root / "badconfig" / "config.json").write_text("{this is not json")
    TokenDataset.from_texts(["the quick brown fox jumps over the lazy dog."] * 40, tiny_model_dir, root / "cache")
    (root / "empty").mkdir()
    return root


def _cases(h, model):
    return {
        "train-tokenizer": (["--input", str(h / "binary.bin"), "--output", str(h / "tok")], "is not UTF-8 text"),
        "init-model": (["--tokenizer", str(model), "--output", str(h / "file.txt")], "exists and is not empty"),
        "info": ([str(h / "badconfig")], "badconfig'"),
        "import-gguf": ([str(h / "binary.bin"), "--output", str(h / "converted")], "is not a GGUF file"),
        "default-model": ([], "is not installed in this Python environment"),
        "generate": (["--input", f"{h}/*.parqet", "--output", str(h / "out")], "matches no Parquet files"),
        "run-batch": (["-i", str(h / "binary.bin"), "-o", str(h / "r.jsonl")], "reads one request file (.jsonl"),
        "replay": (["--output", str(h / "empty"), "--id", "x"], "holds no job"),
        "verify": (["--output", str(h / "empty")], "holds no job"),
        "prepare": (["--input", str(h / "nope.txt"), "--tokenizer", str(model), "--output", str(h / "c")], "not exist"),
        "submit": ([], "nothing to run"),
        "finetune": (
            ["--model", str(model), "--dataset", str(h / "cache"), "--output", str(h / "file.txt"), "--threads", "1"],
            "is a file, not a folder",
        ),
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reports_a_user_error_in_one_line(command, hostile, tiny_model_dir, capsys, monkeypatch):
    """A user error is one line (what, where, the fix) and a non-zero exit, in every command: never a traceback.
    (default-model: a default model whose package is not installed, converted into an empty cache.)"""
    import dataclasses

    from aitextgen_batch.models import default

    monkeypatch.setattr(default, "DEFAULT", dataclasses.replace(default.DEFAULT, package="no-such-model-package"))
    monkeypatch.setenv("AITEXTGEN_BATCH_CACHE", str(hostile / "cache-root"))
    args, message = _cases(hostile, tiny_model_dir)[command]
    capsys.readouterr()
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aitextgen-batch {command}: error: ") and err.count("\n") == 1, err
    assert message in err


def test_replay_of_a_jobs_row_refuses_the_flags_it_would_ignore(capsys):
    row = ["replay", "--output", "out", "--id", "x"]
    for extra in (["--tokenizer", "tok"], ["--temperature", "0.1"], ["--slots", "8"], ["--prompt", "p"]):
        with pytest.raises(SystemExit):
            parse([*row, *extra])
        err = capsys.readouterr().err
        assert f"{extra[0]}) is not used with --output: replay regenerates the row with the job's own" in err
    _, cfg = parse([*row, "--model", "moved/", "--threads", "2", "--json", "--sample-index", "1"])
    assert (cfg.engine.model, cfg.engine.threads, cfg.json, cfg.sample_index) == ("moved/", 2, True, 1)
