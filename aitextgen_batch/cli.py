"""`aitextgen-batch <command>`: every subcommand maps to one library function, all in this one place."""

from __future__ import annotations

import argparse
import sys

from .config import add_dataclass_arguments, config_from_namespace
from .errors import UserError

# What Ctrl-C leaves behind, per command.
RESUME = {
    "generate": "Finished shards are kept: rerun the same command to resume.",
    "run-batch": "Finished shards are kept in the job's folder (--work-dir): rerun the same command to resume.",
    "finetune": "Saved steps are kept: rerun the same command to resume from the last one.",
    "prepare": "Nothing was kept: run it again.",
}


def _train_tokenizer(cfg) -> int:
    from .tokenizer import train_tokenizer

    tok = train_tokenizer(cfg.input, cfg.vocab_size, cfg.output, min_frequency=cfg.min_frequency)
    print(f"wrote tokenizer ({len(tok)} tokens) to {cfg.output}")
    return 0


def _init_model(cfg) -> int:
    from .console import print_table
    from .models.info import model_info
    from .tokenizer import init_model

    out = init_model(cfg.preset, cfg.tokenizer, cfg.output, seed=cfg.seed)
    print_table(model_info(str(out)), title=f"wrote {out}")
    return 0


def _info(cfg) -> int:
    from .console import print_table
    from .data.commands import is_token_cache, run_cache_info
    from .models.info import model_info

    if is_token_cache(cfg.source):
        return run_cache_info(cfg.source)

    print_table(model_info(cfg.source, cfg.tokenizer, cfg.trust_remote_code, cfg.allow_pickle))
    return 0


def _set_threads(threads: int | None) -> None:
    """torch's CPU thread count is process-wide: set here, in the entry point, never by library code."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _replay(cfg) -> int:
    _set_threads(cfg.engine.threads)
    if cfg.output is not None:  # a row of a job's output: the job layer's
        from .batch.verify import run_replay_row

        return run_replay_row(cfg)
    from .generation.options import run_replay

    return run_replay(cfg)


def _generate(cfg) -> int:
    from .batch.api import generate_dataset

    summary = generate_dataset(cfg)
    return 0 if summary.status == "complete" else 1


def _run_batch(cfg) -> int:
    from .batch.openai_batch.command import run_batch

    return run_batch(cfg)


def _verify(cfg) -> int:
    from .batch.verify import run_verify

    _set_threads(cfg.threads)
    return run_verify(cfg)


def _submit(cfg, command: list[str]) -> int:
    from .submit import quiet_ray_logs, run_submit

    quiet_ray_logs()
    return run_submit(cfg, command)


def _commands():
    """name -> (config dataclass, handler). Imports stay light: configs import no torch."""
    from .batch.api import GenerateConfig
    from .batch.openai_batch.command import RunBatchConfig
    from .batch.verify import VerifyConfig
    from .data.commands import PrepareConfig, run_prepare
    from .generation.options import ReplayConfig
    from .models.default import DefaultModelConfig, run_default_model
    from .models.gguf import ImportGgufConfig, run_import_gguf
    from .models.info import InfoConfig
    from .submit import SubmitConfig
    from .tokenizer import InitModelConfig, TrainTokenizerConfig
    from .train import FinetuneConfig, run_finetune

    return {
        "train-tokenizer": (TrainTokenizerConfig, _train_tokenizer),
        "init-model": (InitModelConfig, _init_model),
        "info": (InfoConfig, _info),
        "import-gguf": (ImportGgufConfig, run_import_gguf),
        "default-model": (DefaultModelConfig, run_default_model),
        "generate": (GenerateConfig, _generate),
        "run-batch": (RunBatchConfig, _run_batch),
        "replay": (ReplayConfig, _replay),
        "verify": (VerifyConfig, _verify),
        "prepare": (PrepareConfig, run_prepare),
        "submit": (SubmitConfig, _submit),  # main() hands it the job's command, the part after `--`
        "finetune": (FinetuneConfig, run_finetune),
    }


def build_parser() -> argparse.ArgumentParser:
    """The full parser; also used by tests to check that job and cluster configs parse."""
    parser = argparse.ArgumentParser(
        prog="aitextgen-batch",
        description="Reproducible batch text generation and finetuning of causal LMs on Ray.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (cls, _) in _commands().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=doc, usage=f"%(prog)s [options]  (see: {name} --help)")
        p.add_argument(
            "--config",
            action="append",
            metavar="FILE.yaml",
            help="YAML file of option: value (flags given on the command line win)",
        )
        add_dataclass_arguments(p, cls)
    return parser


def parse(argv: list[str] | None = None):
    """Parse argv into (command name, validated config); exits 2 with the flag named on bad values."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    cls, _ = _commands()[ns.command]
    try:
        return ns.command, config_from_namespace(cls, ns)
    except UserError as exc:
        parser._subparsers._group_actions[0].choices[ns.command].error(str(exc))


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    argv = sys.argv[1:] if argv is None else list(argv)
    job: list[str] = []
    if argv[:1] == ["submit"]:
        # `submit [options] -- COMMAND [flags]`: argparse cannot take the remainder, so split it off here and check
        # the job's command with this same parser: a bad flag is refused before anything is uploaded.
        from .submit import split_submit_argv

        argv, job = split_submit_argv(argv)
        if job:
            parse(job)
    name, cfg = parse(argv)
    if name != "submit":
        from .models.loading import quiet_transformers

        quiet_transformers()  # our own progress and errors are shown instead of its advisory warnings
    try:
        handler = _commands()[name][1]
        return (handler(cfg, job) if name == "submit" else handler(cfg)) or 0
    except UserError as exc:
        print(f"aitextgen-batch {name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user named: missing, a folder, unreadable, a full disk
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in str(exc) else ""
        print(f"aitextgen-batch {name}: error: {exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\naitextgen-batch {name}: interrupted. {RESUME.get(name, '')}".rstrip(), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
