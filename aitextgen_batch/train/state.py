"""Saved steps: a plain Hugging Face folder plus a small training state, written without pickle.

    OUTPUT/checkpoints/step-00001000/
        config.json, generation_config.json, model.safetensors, tokenizer files   <- loads with `load_model`
        training_state/state.json            step, sampler position, smoothed loss, optimizer and scheduler
                                             state with every tensor replaced by a reference into ..., and the
                                             size and sha256 of every other file (checked before a resume)
        training_state/optimizer.safetensors ... this file (flattened keys such as `state.3.exp_avg`)

A step folder is written under a temporary name and renamed when complete, so a crash never leaves a folder
that looks saved. The training state sits in a subfolder so the step folder's `*.safetensors` are the model's
alone (fingerprints hash them all).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from ..errors import UserError

log = logging.getLogger("aitextgen_batch")

STATE_DIR = "training_state"
STATE_FORMAT = "aitextgen-batch/finetune-state"
STATE_VERSION = 1
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def encode_tree(obj, tensors: dict, prefix: str = ""):
    """JSON-able copy of a state dict: tensors go into `tensors` under dotted keys and are replaced by references."""
    import torch

    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not ({_TENSOR, _TUPLE, _ITEMS} & set(obj)):
            return {k: encode_tree(v, tensors, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()}
        # int keys (optimizer `state` is keyed by parameter index) would turn into strings in plain JSON
        return {_ITEMS: [[k, encode_tree(v, tensors, f"{prefix}.{k}" if prefix else str(k))] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode_tree(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a training state (tensors and JSON only)")


def decode_tree(obj, tensors: dict):
    """Inverse of `encode_tree`."""
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(decode_tree(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {k: decode_tree(v, tensors) for k, v in obj[_ITEMS]}
        return {k: decode_tree(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    return obj


def write_state(folder: Path, state: dict, files: dict[str, dict] | None = None) -> None:
    """Write `state` (JSON data with torch tensors anywhere inside) as state.json + optimizer.safetensors.

    Args:
        files: size and sha256 of the step folder's other files (`file_sums`); the optimizer file's are added, and
            `step_problem` checks them all before the step is trusted.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    tree = encode_tree(state, tensors)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    sums = dict(files or {})
    sums[f"{STATE_DIR}/optimizer.safetensors"] = _file_sum(folder / "optimizer.safetensors")
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "state": tree, "files": sums}
    (folder / "state.json").write_text(json.dumps(doc, indent=1))


def _file_sum(path: Path) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def file_sums(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file under `folder` but the training state, by relative path."""
    return {
        p.relative_to(folder).as_posix(): _file_sum(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != STATE_DIR
    }


def step_problem(step_dir: Path) -> str | None:
    """What is wrong with a saved step folder (missing, truncated or changed files), or None when it is intact."""
    path = step_dir / STATE_DIR / "state.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"{path} is unreadable ({exc})"
    for name, want in (doc.get("files") or {}).items():
        f = step_dir / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != want["bytes"] or _file_sum(f)["sha256"] != want["sha256"]:
            return f"{f} differs from the size and sha256 recorded when it was saved"
    return None


def read_state(step_dir: str | Path) -> dict:
    """The training state of a saved step folder."""
    from safetensors.torch import load_file

    folder = Path(step_dir) / STATE_DIR
    path = folder / "state.json"
    if not path.is_file():
        raise UserError(f"{str(step_dir)!r} has no {STATE_DIR}/state.json: not a finetune checkpoint")
    doc = json.loads(path.read_text())
    if doc.get("format") != STATE_FORMAT or doc.get("version") != STATE_VERSION:
        raise UserError(f"{path} is not a version-{STATE_VERSION} aitextgen-batch training state")
    return decode_tree(doc["state"], load_file(str(folder / "optimizer.safetensors")))


def write_step(root: Path, step: int, model, tokenizer, state: dict) -> Path:
    """Save the model, tokenizer and training state of `step` to `root/step-NNNNNNNN` (temp folder, then rename)."""
    final = root / step_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    write_state(tmp / STATE_DIR, {"step": step, **state}, file_sums(tmp))
    if final.exists():  # an earlier attempt saved this step but died before Ray registered it
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def saved_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete and intact step folder under `root`, oldest first.

    A step whose files no longer have the size and sha256 recorded at saving is left out (with a warning): a resume
    never starts from a damaged save.
    """
    out = []
    for p in root.glob("step-*") if root.is_dir() else []:
        if (p / STATE_DIR / "state.json").is_file() and p.name[5:].isdigit():
            problem = step_problem(p)
            if problem:
                log.warning("not resuming from %s: %s", p.name, problem)
                continue
            out.append((int(p.name[5:]), p))
    return sorted(out)


def publish(step_dir: Path, output: Path) -> None:
    """Copy the model files of a step folder into `output`, so `output` itself loads as the finetuned model.

    config.json goes first out and last in: while files are replaced, `output` does not look like a model.
    """
    from ..models.fingerprint import weights_digest
    from ..storage import atomic_write

    weights_digest(None, step_dir, finite=True)  # never publish weights holding NaN or infinities (a UserError)
    files = sorted((f for f in step_dir.iterdir() if f.is_file()), key=lambda f: f.name == "config.json")
    (output / "config.json").unlink(missing_ok=True)
    for f in files:
        with open(f, "rb") as src, atomic_write(output / f.name) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
