"""Load a causal LM and its tokenizer from a local folder, the local hub cache, or a from-scratch preset.

Nothing here downloads: hub ids resolve from the local cache only. Pickle weights are refused unless
the caller opts in, and remote code runs only when asked for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .presets import PRESETS, preset_config

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    """What `load_model` resolved: handy for `info` and for provenance."""

    source: str
    kind: str  # "default", "bundled", "folder", "hub-cache" or "preset"
    folder: Path | None


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and advisory warnings (process-wide: for entry points only)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `count` (when given) for the block and restored after: a CPU matmul splits
    its sums by thread count, so a CPU job's rows are made and re-made with the count recorded for them."""
    import torch

    before = torch.get_num_threads()
    try:
        if count:
            torch.set_num_threads(count)
        yield
    finally:
        torch.set_num_threads(before)


def default_device() -> str:
    """`cuda` when a GPU is visible, else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# The accepted dtype names (flags, configs, the Python API) and the canonical name each one means.
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def dtype_name(dtype) -> str:
    """The canonical name (`float32`, `float16`, `bfloat16`) of a dtype name or torch dtype.

    Raises:
        UserError: not one of `DTYPE_NAMES` (the message lists them).
    """
    text = str(dtype).removeprefix("torch.")
    if text not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[text]


def default_dtype_name(device: str) -> str:
    """The one default dtype rule: `float32` on CPU (exact and batch-invariant), `bfloat16` on CUDA.

    The same on every machine, so a job's driver (which may have no GPU) records the dtype its GPU actors use.
    """
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def default_dtype(device: str):
    """The torch dtype of `default_dtype_name(device)`."""
    return resolve_dtype(default_dtype_name(device))


def resolve_dtype(dtype):
    """A torch dtype from a torch dtype or any name in `DTYPE_NAMES` (None stays None)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, dtype_name(dtype))


def _check_device_dtype(device: str, dtype) -> None:
    import torch

    if str(device).startswith("cuda") and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16, the default dtype on CUDA; "
            "pass --dtype float16 (or dtype='float16')"
        )


# Sizes a config may state (GPT-2 and Llama-style names): each must be a positive integer when given.
CONFIG_SIZES = (
    "n_layer", "num_hidden_layers", "n_head", "num_attention_heads", "num_key_value_heads", "n_embd", "hidden_size",
    "n_inner", "intermediate_size", "vocab_size", "n_positions", "n_ctx", "max_position_embeddings", "head_dim",
)  # fmt: skip


def check_config_file(folder: str | Path) -> None:
    """Refuse a `config.json` that is not a JSON object, or that states a size that is not a positive integer.

    Raises:
        UserError: naming the file, the key and its value.
    """
    import json

    where = f"{str(folder)!r}: cannot load its config.json"
    try:
        data = json.loads((Path(folder) / "config.json").read_bytes())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{where} (not valid JSON: {exc}); fix or re-save the model folder") from exc
    if not isinstance(data, dict):
        raise UserError(f"{where} (it holds a JSON {type(data).__name__}, not an object of config keys); fix it")
    for key in CONFIG_SIZES:
        value = data.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise UserError(f"{where} ({key} is {value!r}; it must be a positive integer); fix the config")


def load_config(folder: str | Path, trust_remote_code: bool = False):
    """A model folder's config (`config.json`); an unreadable or invalid one is a UserError naming the file."""
    from transformers import AutoConfig

    check_config_file(folder)
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(_load_error(folder, "config.json", exc)) from exc


def _load_error(folder, what: str, exc: Exception) -> str:
    if "trust_remote_code" in str(exc):
        return f"{str(folder)!r} needs its own model code; pass --trust-remote-code if you trust it"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{str(folder)!r}: cannot load its {what} ({first}); fix or re-save the model folder"


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    """Load a fast tokenizer from a folder and make it ready for batched decoding (left padding, a pad id)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"tokenizer folder {str(folder)!r} does not exist; "
            "create one with `aitextgen-batch train-tokenizer` or pass a model folder"
        )
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise UserError(
            f"{str(folder)!r} holds no tokenizer (tokenizer.json); create one with `aitextgen-batch train-tokenizer`"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: a config.json that is no mapping
        raise UserError(_load_error(folder, "tokenizer", exc)) from exc
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok):
    """Left padding and a pad token: a tokenizer without one pads with eos (masked out anyway)."""
    if not getattr(tok, "is_fast", False):
        raise UserError("only fast (Rust `tokenizers`) tokenizers are supported; save yours with tokenizer.json")
    tok.padding_side = "left"
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def _check_vocab(model, tok, where: str) -> None:
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tok) > n_embed:
        raise UserError(
            f"{where}: the tokenizer has {len(tok)} tokens but the model's embedding has only "
            f"{n_embed} rows; use the tokenizer the model was trained with "
            "(or re-create the model with `aitextgen-batch init-model --tokenizer DIR`)"
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
VOCAB_SLACK = 1024  # embedding rows a model may have beyond its tokenizer's tokens (padded to a multiple, reserved)


def check_tokenizer_fits(folder: Path | None, tok, given, n_embed: int, trust_remote_code: bool = False) -> None:
    """Refuse a tokenizer given with --tokenizer that is not the model's: its ids would mean other text, and the model
    would generate garbage without a word.

    A model folder with a tokenizer of its own: the given one must have the same vocabulary. Without one: the given
    tokenizer must cover the embedding, up to `VOCAB_SLACK` rows of padding (a larger tokenizer is `_check_vocab`'s).
    """
    if folder is None or given is None or Path(given).resolve() == Path(folder).resolve():
        return
    where = f"--tokenizer {str(given)!r}"
    if any((Path(folder) / f).exists() for f in TOKENIZER_FILES):
        own = load_tokenizer(folder, trust_remote_code=trust_remote_code)
        if own.get_vocab() != tok.get_vocab():
            raise UserError(
                f"{where} ({len(tok)} tokens) is not the tokenizer of {str(folder)!r} ({len(own)} tokens, other ids): "
                "the model would turn its ids into other text. Drop --tokenizer to use the model's own, or pass a "
                "tokenizer with the same vocabulary"
            )
    elif len(tok) < n_embed - VOCAB_SLACK:
        raise UserError(
            f"{where} has {len(tok)} tokens but the model's embedding has {n_embed} rows: it is not the tokenizer the "
            "model was trained with; pass that one"
        )


def check_folder_weights(folder: Path, allow_pickle: bool, *, pickle_flag: bool = True) -> None:
    """Refuse a model folder without weights, or with pickle weights only unless `allow_pickle`.

    Args:
        pickle_flag: the command takes --allow-pickle (`finetune` does not: its message says to convert instead).
    """
    if any((folder / f).exists() for f in WEIGHT_FILES) or list(folder.glob("*.safetensors")):
        return
    if any((folder / f).exists() for f in PICKLE_FILES):
        if allow_pickle:
            return
        fix = " or pass --allow-pickle / allow_pickle=True if you trust the file" if pickle_flag else " first"
        raise UserError(
            f"{str(folder)!r} has only pickle weights (pytorch_model.bin), which can run arbitrary "
            f"code when loaded; convert them to safetensors (model.save_pretrained(dir)){fix}"
        )
    raise UserError(
        f"{str(folder)!r} has a config but no weights (model.safetensors); "
        "save the model with save_pretrained or create one with `aitextgen-batch init-model`"
    )


def _looks_like_path(source: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with slashes or a leading `.`/`~` is a path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith("/") or "\\" in source


def _hub_snapshot(repo_id: str) -> Path:
    """The local cache folder of hub id `repo_id`, without network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except (ImportError, OSError, ValueError) as exc:  # not cached (a LocalEntryNotFoundError), or not a valid id
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise UserError(
            f"{repo_id!r} is not a local folder, a preset ({', '.join(PRESETS)}), or a hub id in the local "
            f"Hugging Face cache ({cache}). "
            "aitextgen-batch never downloads at run time: pre-download it on a machine with network "
            f"(`hf download {repo_id}`) and copy the cache, or pass a local model folder. ({type(exc).__name__})"
        ) from exc


def resolve_source(source: str) -> LoadedModel:
    """Decide what `source` names: the default model (empty), the bundled small model (`pydoc-gpt2`), an existing
    folder, an object-store folder, a preset, or a cached hub id.

    The default model is converted into the cache on first use, and checked on every use (`default.py`)."""
    from .default import SMALL_MODEL, SMALL_MODEL_NAME, ensure_default_model

    if not source:
        folder = ensure_default_model()
        return LoadedModel("", "default", folder)
    if source == SMALL_MODEL_NAME:
        return LoadedModel(source, "bundled", SMALL_MODEL)
    source = str(source)
    from ..storage import is_uri, local_copy

    if is_uri(source):  # a model folder on an object store: downloaded once into the local cache
        folder = local_copy(source, "model")
        if not (folder / "config.json").exists():
            raise UserError(f"{source!r} holds no config.json: not a Hugging Face model folder")
        return LoadedModel(source, "folder", folder)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{source!r} is a folder but has no config.json: not a Hugging Face model folder")
        return LoadedModel(source, "folder", path)
    if path.exists():
        raise UserError(f"{source!r} is a file; pass the model folder that holds config.json and the weights")
    if source in PRESETS:
        return LoadedModel(source, "preset", None)
    if _looks_like_path(source):
        raise UserError(f"model folder {source!r} does not exist")
    return LoadedModel(source, "hub-cache", _hub_snapshot(source))


def load_model(
    source: str,
    device: str | None = None,
    dtype=None,
    *,
    tokenizer: str | Path | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
    seed: int = 0,
):
    """Load a causal LM and its tokenizer.

    Args:
        source: a local Hugging Face folder (config + safetensors + tokenizer), a hub id already in the
            local cache, or a preset name (`tiny`, `small`, `gpt2-124m`, ...) built from scratch.
        device: `cuda`, `cpu`, `cuda:1`...; default CUDA when available.
        dtype: torch dtype or name (`DTYPE_NAMES`); default `default_dtype_name(device)`.
        tokenizer: tokenizer folder; required for presets, overrides the model folder's own otherwise.
        trust_remote_code: run model code shipped with the weights (off unless asked).
        allow_pickle: accept `pytorch_model.bin` weights (pickle) when no safetensors exist.
        attn_implementation: `eager`, `sdpa`, ... (the engine asks for `eager`: it is batch-invariant).
        seed: weight-init seed for presets (torch's global random state is left as it was).

    Returns:
        (model, tokenizer), the model in eval mode on `device`.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from .fingerprint import NOT_FINITE, non_finite

    resolved = resolve_source(source)
    source = resolved.source or str(resolved.folder)
    device = device or default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    _check_device_dtype(device, dtype)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}

    if resolved.kind == "preset":
        if tokenizer is None:
            raise UserError(
                f"preset {source!r} needs a tokenizer: pass --tokenizer DIR "
                "(make one with `aitextgen-batch train-tokenizer`)"
            )
        tok = load_tokenizer(tokenizer)
        config = preset_config(source, tok)
        with torch.random.fork_rng(devices=[]):  # seeds the init without reseeding the caller's global RNG
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, **extra)
    else:
        folder = resolved.folder
        check_config_file(folder)
        check_folder_weights(folder, allow_pickle)
        tok_dir = Path(tokenizer) if tokenizer is not None else folder
        tok = load_tokenizer(tok_dir, trust_remote_code=trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder),
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                local_files_only=True,
                use_safetensors=not allow_pickle or None,
                **extra,
            )
        except (OSError, ValueError, SafetensorError) as exc:  # an invalid config, unreadable weights, remote code
            raise UserError(_load_error(source, "config and weights", exc)) from exc
        _check_vocab(model, tok, source)
        n_embed = model.get_input_embeddings().weight.shape[0]
        check_tokenizer_fits(folder, tok, tokenizer, n_embed, trust_remote_code)
        bad = next((name for name, p in model.named_parameters() if non_finite(p)), None)
        if bad is not None:
            raise UserError(f"{source!r}: weight {bad!r} {NOT_FINITE}; use another model or checkpoint")
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, tok
