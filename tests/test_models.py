"""Model/tokenizer loading: every source kind, round trips, fingerprints and every error message."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from aitextgen_batch.errors import UserError
from aitextgen_batch.models import load_model, load_tokenizer, model_fingerprint, resolve_source
from aitextgen_batch.tokenizer import init_model, train_tokenizer


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_import_is_cheap():
    code = "import sys, aitextgen_batch, aitextgen_batch.cli; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tokenizer_folder_special_tokens_and_round_trip(tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    assert 300 < len(tok) <= 400
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.padding_side == "left"
    text = "The quick brown fox jumps over the lazy dog. Zebras!"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path)(text)["input_ids"] == ids


def test_folder_round_trip_identical_weights(tokenizer_dir, tiny_model_dir):
    fresh, tok = load_model("tiny", device="cpu", tokenizer=tokenizer_dir, seed=0)
    loaded, tok2 = load_model(str(tiny_model_dir), device="cpu")
    a, b = _state(fresh), _state(loaded)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config.vocab_size == len(tok2) == len(tok)
    assert (loaded.config.eos_token_id, loaded.config.pad_token_id) == (tok2.eos_token_id, tok2.pad_token_id)
    assert resolve_source(str(tiny_model_dir)).kind == "folder"
    # Same weights, config and tokenizer: the same fingerprint in memory and from the files.
    assert model_fingerprint(fresh, tok) == model_fingerprint(loaded, tok2, tiny_model_dir)


def test_preset_seed_changes_weights_and_fingerprint(tokenizer_dir):
    m0, tok = load_model("tiny", device="cpu", tokenizer=tokenizer_dir, seed=0)
    m1, _ = load_model("tiny", device="cpu", tokenizer=tokenizer_dir, seed=1)
    assert model_fingerprint(m0, tok) != model_fingerprint(m1, tok)
    assert model_fingerprint(m0, tok).startswith("sha256:")


def test_fingerprint_sees_tokenizer_change(tiny_model_dir, tmp_path):
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    other = train_tokenizer(
        texts=["completely different text here"] * 50, vocab_size=300, output=tmp_path / "t2", min_frequency=1
    )
    assert model_fingerprint(model, tok) != model_fingerprint(model, other)


def test_other_architecture_llama(tokenizer_dir, tmp_path):
    out = init_model("llama-tiny", tokenizer_dir, tmp_path / "llama")
    model, tok = load_model(str(out), device="cpu", dtype="float32")
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([tok("the fox")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_hub_cache_source(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    model, tok = load_model("acme/tiny", device="cpu")
    assert resolve_source("acme/tiny").kind == "hub-cache"
    assert model.config.vocab_size == len(tok)


def test_error_missing_folder():
    with pytest.raises(UserError, match=r"model folder './no/such/model' does not exist"):
        load_model("./no/such/model")


def test_error_folder_without_weights(tiny_model_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(UserError, match=r"has a config but no weights \(model.safetensors\)"):
        load_model(str(tmp_path))


def test_error_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        load_model(str(tmp_path))


def test_pickle_only_weights_refused_unless_opted_in(tiny_model_dir, tmp_path):
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    model.save_pretrained(tmp_path, safe_serialization=False) if _save_takes_safe() else _save_bin(model, tmp_path)
    tok.save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    assert (tmp_path / "pytorch_model.bin").exists()
    with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        load_model(str(tmp_path))
    loaded, _ = load_model(str(tmp_path), device="cpu", allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def _save_takes_safe() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def _save_bin(model, path):
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")


def test_error_vocab_mismatch(tiny_model_dir, tmp_path):
    big = train_tokenizer(
        texts=[f"word{i} " * 3 for i in range(3000)], vocab_size=1000, output=tmp_path / "big", min_frequency=1
    )
    assert len(big) > 420
    with pytest.raises(UserError, match=r"the tokenizer has \d+ tokens but the model's embedding has only \d+ rows"):
        load_model(str(tiny_model_dir), tokenizer=tmp_path / "big")


def test_error_unknown_preset_and_preset_without_tokenizer(tokenizer_dir):
    with pytest.raises(UserError, match="is not a local folder, a preset"):
        load_model("gpt9-huge", tokenizer=tokenizer_dir)
    with pytest.raises(UserError, match="preset 'tiny' needs a tokenizer"):
        load_model("tiny")


def test_error_offline_hub_id(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"never downloads at run time.*hf download openai-community/gpt2"):
        load_model("openai-community/gpt2")


def test_trust_remote_code_off_by_default(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "custom-thing"
    cfg["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomModel",
    }
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="--trust-remote-code"):
        load_model(str(tmp_path / "m"))


def test_one_context_length_rule():
    from transformers import GPT2Config, LlamaConfig, PretrainedConfig

    from aitextgen_batch.models.context import DEFAULT_CONTEXT, context_length

    assert context_length(GPT2Config(n_positions=256)) == 256
    assert context_length(LlamaConfig(max_position_embeddings=4096)) == 4096
    assert context_length(PretrainedConfig()) == DEFAULT_CONTEXT == 2048  # no field: one documented fallback


def test_one_dtype_table_and_one_default_rule():
    from aitextgen_batch.generation.options import EngineConfig
    from aitextgen_batch.models.loading import DTYPE_NAMES, default_dtype, default_dtype_name, dtype_name

    for name in DTYPE_NAMES:  # every name load_model takes, the flags take too
        assert EngineConfig(dtype=name).dtype == name
    with pytest.raises(UserError, match=r"dtype \(--dtype\) must be one of float32, fp32"):
        EngineConfig(dtype="float64")
    assert dtype_name("bf16") == dtype_name(torch.bfloat16) == "bfloat16" and dtype_name("half") == "float16"
    # the job records the dtype load_model uses, by the same rule, on every machine
    assert EngineConfig().resolved("cuda").dtype == default_dtype_name("cuda") == "bfloat16"
    assert EngineConfig().resolved("cpu").dtype == "float32" and default_dtype("cpu") == torch.float32
    assert EngineConfig(dtype="fp16").resolved("cuda").dtype == "float16"


def test_loading_a_preset_leaves_the_global_rng_alone(tokenizer_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny", device="cpu", tokenizer=tokenizer_dir, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_invalid_config_json_is_a_user_error(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"'.*m': cannot load its (tokenizer|config)"):
        load_model(str(tmp_path / "m"))


def _imported_top_modules(path) -> set[str]:
    """The `aitextgen_batch` subpackages/modules a file in a subpackage imports (at any depth in the file)."""
    import ast

    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 2:  # from ..X import y / from .. import X
            tops |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("aitextgen_batch.")
        ):
            tops.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            tops |= {a.name.split(".")[1] for a in node.names if a.name.startswith("aitextgen_batch.")}
    return tops


def test_core_packages_do_not_import_the_job_layers():
    """generation/, models/ and data/ (the core) import nothing from batch/, train/ or submit.py."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "aitextgen_batch"
    bad = [
        f"{path.relative_to(root)} imports {top}"
        for package in ("generation", "models", "data")
        for path in sorted((root / package).glob("*.py"))
        for top in _imported_top_modules(path) & {"batch", "train", "submit"}
    ]
    assert not bad, bad
    assert "batch" not in _imported_top_modules(root / "train" / "api.py")  # the Ray helper is raycluster.py's


def test_a_tokenizer_that_is_not_the_models_is_refused(tiny_model_dir, tokenizer_dir, tmp_path, capsys):
    import shutil

    from aitextgen_batch.batch.api import generate_dataset
    from aitextgen_batch.cli import main
    from aitextgen_batch.models.default import SMALL_MODEL as DEFAULT_MODEL

    bundled = str(DEFAULT_MODEL)  # 5,000 tokens; the test tokenizer has far fewer, with other ids
    argv = ["replay", "--model", bundled, "--tokenizer", str(tokenizer_dir), "--prompt", "The", "--seed", "1"]
    assert main([*argv, "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--tokenizer '{tokenizer_dir}' (" in err and "is not the tokenizer of" in err
    (tmp_path / "p.jsonl").write_text('{"prompt": "The"}\n')
    with pytest.raises(UserError, match="is not the tokenizer of"):
        generate_dataset(input=str(tmp_path / "p.jsonl"), output=str(tmp_path / "o"), model=bundled,
                         tokenizer=str(tokenizer_dir), in_process=True)  # fmt: skip
    assert not (tmp_path / "o").exists()
    # the model's own tokenizer, given from another folder, is fine
    own = tmp_path / "own"
    own.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, own / f.name)
    model, tok = load_model(str(tiny_model_dir), device="cpu", tokenizer=own)
    # a weights-only folder with a tokenizer far smaller than its embedding
    bare = tmp_path / "bare"
    shutil.copytree(DEFAULT_MODEL, bare, ignore=shutil.ignore_patterns("tokenizer*", "*.txt", "*.md", "LICENSE*"))
    with pytest.raises(UserError, match=r"has \d+ tokens but the model's embedding has 5000 rows: it is not the"):
        load_model(str(bare), device="cpu", tokenizer=tokenizer_dir)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("list", r"cannot load its config.json \(it holds a JSON list, not an object of config keys\)"),
        ("n_layer", r"cannot load its config.json \(n_layer is -1; it must be a positive integer\)"),
        ("truncated", r"model.safetensors' is not a readable safetensors file \(.*\): truncated or damaged"),
    ],
)
def test_a_damaged_model_folder_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys, damage, message):
    from aitextgen_batch.cli import main

    bad = tmp_path / "m"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    if damage == "list":
        (bad / "config.json").write_text("[1, 2]")
    elif damage == "n_layer":
        (bad / "config.json").write_text(json.dumps({**config, "n_layer": -1}))
    else:
        weights = bad / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=str(bad)):
        load_model(str(bad), device="cpu")
    (tmp_path / "p.jsonl").write_text('{"prompt": "the fox"}\n')
    argv = ["generate", "--model", str(bad), "--input", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "o")]
    assert main([*argv, "--in-process"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(bad) in err and re.search(message, err)
    assert not (tmp_path / "o").exists()
