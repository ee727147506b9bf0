"""`aitextgen-batch run-batch -i requests.jsonl -o results.jsonl`: an OpenAI batch file as a resumable job.

The requests run as a job in a folder of its own (`--work-dir`, by default the results file's name with `.job`):
sharded, resumable, exactly once, `verify` and `replay --id CUSTOM_ID` on that folder. Nothing is written to the
results file until every shard is done or has failed; then it is written from the shards, whole (an interrupted run
leaves the finished shards, and rerunning the command resumes and writes the same file).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ...config import check
from ...generation.options import EngineConfig
from ...generation.params import SamplingParams
from ..api import GenerateConfig


def openai_sampling() -> SamplingParams:
    """What a request leaves out, as the OpenAI API means it: temperature 1, top_p 1, no top-k, and the text as the
    model wrote it (no stripping, no re-draw of an empty text). Flags change these defaults; a body's fields win."""
    return SamplingParams(temperature=1.0, top_k=0, lstrip=False, nonempty_output=False)


def _like(name: str):
    """The field `name` of `GenerateConfig`, again: one default and one help text for both commands."""
    f = {f.name: f for f in dataclasses.fields(GenerateConfig)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


@dataclass
class RunBatchConfig:
    """Run an OpenAI batch file (/v1/chat/completions, /v1/completions) as a resumable job; write its results file."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingParams = field(default_factory=openai_sampling)
    input: str = field(
        default="",
        metadata={"help": "the request file: one {custom_id, method, url, body} per line", "aliases": ["-i"]},
    )
    output: str = field(
        default="", metadata={"help": "the results file to write: one line per request, in order", "aliases": ["-o"]}
    )
    work_dir: str | None = field(
        default=None, metadata={"help": "the job's folder (Parquet shards, _job.json); default: OUTPUT's name + .job"}
    )
    served_model_name: list[str] = _like("served_model_name")
    ignore_model_name: bool = _like("ignore_model_name")
    chat_template: str | None = _like("chat_template")
    system_prompt: str | None = _like("system_prompt")
    logprobs: bool = _like("logprobs")
    seed: int = _like("seed")
    shard_rows: int = _like("shard_rows")
    batch_size: int = _like("batch_size")
    num_actors: int | None = _like("num_actors")
    gpus_per_actor: float | None = _like("gpus_per_actor")
    address: str | None = _like("address")
    max_shard_attempts: int = _like("max_shard_attempts")
    in_process: bool = _like("in_process")
    overwrite: bool = _like("overwrite")
    quiet: bool = _like("quiet")
    price_per_hour: float | None = _like("price_per_hour")

    def __post_init__(self):
        check(bool(self.input), "input", "is required: the request file (-i requests.jsonl)")
        check(bool(self.output), "output", "is required: the results file to write (-o results.jsonl)")
        check(self.output != self.input, "output", "is the request file: write the results to another file")
        if self.work_dir is None:
            self.work_dir = self.output.removesuffix(".jsonl") + ".job"
        work = self.work_dir.rstrip("/")
        check(
            not (self.output + "/").startswith(work + "/"),
            "output",
            f"lies inside --work-dir {self.work_dir!r} (which holds only the job's files): write it elsewhere",
        )
        self.job_config()  # every flag checked now, by the job's rules

    def job_config(self) -> GenerateConfig:
        """The job that runs the requests."""
        shared = {f.name for f in dataclasses.fields(GenerateConfig)} & {f.name for f in dataclasses.fields(self)}
        values = {name: getattr(self, name) for name in shared - {"output"}}
        return GenerateConfig(**values, output=self.work_dir, input_format="openai-batch")


def run_batch(config: RunBatchConfig | None = None, **options) -> int:
    """Run (or resume) the requests of `config.input` and write `config.output`; returns the exit status (0: every
    shard done; 1: a shard failed, its requests are error lines; rerun to retry). Options are the CLI flags.

    Raises:
        UserError: a bad request file (a line that is not a request, a custom_id used twice), model or flags: nothing
            is written.
    """
    from ...config import build_config
    from ..api import generate_dataset
    from ..verify import load_job
    from .results import write_results

    cfg = config or build_config(RunBatchConfig, options)
    summary = generate_dataset(cfg.job_config())
    job = load_job(cfg.work_dir)
    written = write_results(job, cfg.output, job_tokenizer(job))
    print(
        f"wrote {written.requests:,} results ({written.errors:,} error lines) to {cfg.output}; the job: {cfg.work_dir}",
        flush=True,
    )
    return 0 if summary.status == "complete" else 1


def job_tokenizer(job):
    """The tokenizer of a job's model (the token texts and bytes of its log-probabilities)."""
    from ...models.loading import load_tokenizer, resolve_source

    folder = job.model.tokenizer or resolve_source(job.model.source).folder
    return load_tokenizer(folder, trust_remote_code=job.model.trust_remote_code)
