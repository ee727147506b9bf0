"""The CLI: commands listed, flags generated from the config dataclasses, YAML configs, flag-naming errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aitextgen_batch.cli import main, parse


def test_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "aitextgen_batch", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("train-tokenizer", "init-model", "info"):
        assert cmd in out


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
