"""GGUF checkpoints (llama.cpp's format) into plain Hugging Face folders, with transformers' own GGUF support.

`from_pretrained(folder, gguf_file=NAME)` reads and dequantizes a GGUF file (it needs the `gguf` and `accelerate`
packages), but a model loaded that way refuses `save_pretrained`. So the architecture is built plainly from the
GGUF's config and given the dequantized weights (the logits of the two are compared before anything is written),
then saved with its tokenizer and chat template. No GGUF parsing of our own.

A conversion is written into a temporary sibling folder, recorded in `IMPORT_RECORD` (the source file's sha256
and every written file's size and sha256), then renamed into place: a reader never sees half a folder, and
`check_import` tells a complete folder from a damaged one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

IMPORT_RECORD = "_import.json"
GGUF_MAGIC = b"GGUF"


@dataclass
class ImportGgufConfig:
    """Convert a GGUF checkpoint (llama.cpp format) into a Hugging Face model folder the engine loads."""

    gguf: Path = field(default=Path(), metadata={"help": "the .gguf file", "positional": True})
    output: Path = field(default=Path(), metadata={"help": "folder to write (replaced if it holds an import)"})
    dtype: str = field(default="float32", metadata={"help": "dtype of the saved weights: float32, bfloat16, float16"})

    def __post_init__(self):
        from ..config import check
        from .loading import DTYPE_NAMES

        check(str(self.gguf) not in ("", "."), "gguf", "is required: the .gguf file to convert")
        check(str(self.output) not in ("", "."), "output", "is required: the folder to write")
        check(self.dtype in DTYPE_NAMES, "dtype", f"must be one of {', '.join(DTYPE_NAMES)}", self.dtype)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _needs() -> None:
    from importlib.util import find_spec

    missing = [name for name in ("gguf", "accelerate") if find_spec(name) is None]
    if missing:
        raise UserError(
            f"reading a GGUF file needs the package(s) {', '.join(missing)} (transformers' GGUF support): "
            f"pip install {' '.join(missing)}"
        )


def import_gguf(gguf_file: str | Path, output: str | Path, dtype: str = "float32", *, source_sha256: str | None = None):
    """Convert `gguf_file` into a Hugging Face folder at `output` (weights, config, tokenizer, chat template).

    Args:
        gguf_file: a GGUF checkpoint of an architecture transformers reads from GGUF (Llama, Qwen2, Mistral, ...).
        output: the folder to write; an existing folder is replaced only if it holds an earlier import (or is empty).
        dtype: dtype of the saved weights (the quantized weights are dequantized to it).
        source_sha256: the expected sha256 of `gguf_file`, checked before converting when given.

    Returns:
        The output folder.

    Raises:
        UserError: the file is missing or not GGUF, its checksum differs, the GGUF packages are missing,
            transformers cannot read its architecture, or `output` holds something else.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .loading import resolve_dtype

    src, out = Path(gguf_file).expanduser(), Path(output).expanduser()
    if not src.is_file():
        raise UserError(f"GGUF file {str(src)!r} does not exist")
    with open(src, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"{str(src)!r} is not a GGUF file (it does not start with 'GGUF')")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / IMPORT_RECORD).exists())):
        raise UserError(f"--output {str(out)!r} exists and is not an earlier import; pass a new folder")
    _needs()
    digest = sha256_file(src)
    if source_sha256 and digest != source_sha256:
        raise UserError(
            f"{str(src)!r} has sha256 {digest}, not the expected {source_sha256}: the file is damaged or another "
            "version; reinstall it"
        )
    torch_dtype = resolve_dtype(dtype)
    folder, name = str(src.parent), src.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"transformers cannot read {str(src)!r} ({first})") from exc
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.eval()
    _same_logits(quantized.eval(), plain, tokenizer)
    del quantized
    plain.to(torch_dtype)
    config.name_or_path = ""  # the GGUF's internal title otherwise lands in config.json

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        record = {
            "source": name,
            "source_sha256": digest,
            "dtype": str(torch_dtype).removeprefix("torch."),
            "files": files,
            "created": time.time(),
            "versions": _versions(),
        }
        (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _same_logits(a, b, tokenizer) -> None:
    """Refuse a conversion whose plain model does not compute what the GGUF-loaded one does."""
    import torch

    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = float((a(ids).logits - b(ids).logits).abs().max())
    if diff > 1e-4:
        raise UserError(f"the converted model's logits differ from the GGUF-loaded model's by {diff:.3g}; not saved")


def _replace(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing an earlier folder (moved aside first, removed after)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_import(folder: Path) -> str | None:
    """Why `folder` is not a complete, intact import (None when it is): a missing record or file, or a file whose
    size or sha256 differs from the record."""
    folder = Path(folder)
    try:
        record = json.loads((folder / IMPORT_RECORD).read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{folder} has no readable {IMPORT_RECORD}"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, not {want['bytes']}"
        if sha256_file(path) != want["sha256"]:
            return f"{path} does not match its recorded sha256"
    return None


def read_record(folder: Path) -> dict:
    """The import record of `folder` (empty when it has none)."""
    try:
        return json.loads((Path(folder) / IMPORT_RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "gguf", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_import_gguf(cfg: ImportGgufConfig) -> int:
    """`aitextgen-batch import-gguf FILE.gguf --output DIR`."""
    from .loading import quiet_transformers

    quiet_transformers()
    out = import_gguf(cfg.gguf, cfg.output, cfg.dtype)
    print(f"wrote {out} (from {cfg.gguf}); load it with --model {out}")
    return 0
