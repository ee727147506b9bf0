"""The job folder and its records: `_job.json` (a `JobSpec`), `_done/NNNNN.json` (a `DoneRecord` per finished shard),
`part-NNNNN.parquet` result shards, and `_inputs/NNNNN.parquet`, the Parquet copies of JSONL inputs that the actors
read. Temporary files start with `.` (local disk only).

Readers (pandas, pyarrow, polars, DuckDB, HF datasets) skip names starting with `_` or `.`, so reading OUT gives
exactly the result rows. A shard counts as done only when its completion record exists and its part file still has
the size and sha256 the record states: the record is written after the part file is complete under its final name
(locally through a rename, on object stores by one atomic PUT), and a part file damaged since is noticed and redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field

from ..errors import UserError
from ..generation.options import NUMERICS_VERSION, EngineConfig
from ..generation.params import SamplingParams
from ..storage import Location

JOB_FILE = "_job.json"
DONE_DIR = "_done"
INPUTS_DIR = "_inputs"  # Parquet copies of JSONL inputs
FORMAT = "aitextgen-batch/job/v1"


@dataclass
class InputFile:
    """One input file; shards refer to it by its index in `JobSpec.files`.

    A JSONL file is read through its Parquet copy `staged` (in OUT/_inputs/, where every actor can read it).
    """

    path: str  # as given/resolved
    name: str  # relative to the input root: used in derived ids
    rows: int
    staged: str | None = None
    bytes: int | None = None  # the file's size and sha256 when the job was checked: part of the job's identity
    sha256: str | None = None

    @property
    def identity(self) -> list:
        """What identifies this input in a job: [name, rows, bytes, sha256] (a rerun on an edited file is refused)."""
        return [self.name, self.rows, self.bytes, self.sha256]

    @property
    def parquet(self) -> str:
        """The Parquet file that holds this input's rows."""
        return self.staged or self.path


@dataclass
class ModelSpec:
    """How to load the job's model (an empty source is the bundled default model)."""

    source: str
    tokenizer: str | None
    trust_remote_code: bool
    allow_pickle: bool

    @classmethod
    def of(cls, config: EngineConfig) -> ModelSpec:
        """How `config` loads its model."""
        tokenizer = str(config.tokenizer) if config.tokenizer else None
        return cls(config.model, tokenizer, config.trust_remote_code, config.allow_pickle)


@dataclass
class Numerics:
    """What fixes the engine's arithmetic: device kind, dtype (canonical name), the fixed shapes (decode slots and
    prefill rows) and the version of the engine's arithmetic (`generation.options.NUMERICS_VERSION`).

    Jobs written before version 2 recorded neither prefill rows nor a version: they read as version 1.
    """

    device: str
    dtype: str
    slots: int
    prefill_rows: int = 0
    version: int = 1

    @classmethod
    def of(cls, config: EngineConfig) -> Numerics:
        """The numerics of a resolved config (`EngineConfig.resolved`), at this version of the arithmetic."""
        return cls(config.device, config.dtype, config.slots, config.prefill_rows, NUMERICS_VERSION)


@dataclass
class Columns:
    """Input column names: prompt, id (None: ids derive from file and row), seed (None: derived; a null seed is derived
    too), kept columns, chat messages (None: the prompt column is read) and per-row sampling params (None: the job's
    for every row), and `error`: a column whose text, where not null, makes the row an error row (the requests of an
    OpenAI batch file that cannot be served: `openai_batch.requests`)."""

    prompt: str
    id: str | None
    seed: str | None
    keep: list[str]
    messages: str | None = None
    params: str | None = None
    error: str | None = None


@dataclass
class ChatSpec:
    """How chat rows are rendered: `mode` is "messages" (the messages column), "prompt" (`--chat`: the prompt as one
    user message) or "requests" (an OpenAI batch file: a row with messages is rendered, a row with a prompt is taken
    as it is); the template (by its sha256; `JobSpec.chat_template` holds its text) and the system prompt."""

    mode: str
    template_sha256: str
    system_prompt: str | None = None


@dataclass
class RequestSpec:
    """How the requests of an OpenAI batch file are read (`--input-format openai-batch`): the model names a request's
    `model` may give (the first is the one responses report), or any name with `ignore_model_name`."""

    served_model_names: list[str]
    ignore_model_name: bool = False


@dataclass
class Identity:
    """Everything that determines a job's output rows; a rerun into the same OUT must have the same identity."""

    model_fingerprint: str
    sampling: SamplingParams  # the job's params (a row's own, with --params-column, replace some of them)
    job_seed: int
    columns: Columns
    inputs: list[list]  # [file name, rows, bytes, sha256] per input file (older jobs: [name, rows])
    shard_rows: int
    engine: Numerics
    chat: ChatSpec | None = None
    logprobs: bool = False  # the output has cumulative_logprob
    return_tokens: bool = False  # the output has token_ids and token_logprobs
    requests: RequestSpec | None = None  # the input is an OpenAI batch file
    top_logprobs: bool = False  # the output has top_logprobs (--top-logprobs, or per-row params: a row may ask)
    prompt_logprobs: bool = False  # the output has prompt_logprobs (--prompt-logprobs, or per-row params)


@dataclass
class ShardPlan:
    """A shard of the plan (`plan.plan_shards`) and, once the job ran, its state and counts."""

    shard: int
    rows: int
    segments: list[list[int]]  # [file index, start row, end row] runs of input rows
    state: str = "pending"  # pending | done | failed
    rows_out: int | None = None
    tokens: int | None = None
    errors: int | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass
class DoneRecord:
    """The completion record of a shard, written after its part file; `bytes` and `sha256` vouch for that file."""

    shard: int
    file: str
    rows_in: int
    rows_out: int
    tokens: int
    errors: int
    seconds: float
    host: str
    pid: int
    bytes: int
    sha256: str
    first_error: str | None = None  # the first error row's message, for a job whose every row failed
    # torch's CPU threads while the shard ran: a CPU matmul splits its sums by thread count, so the rows' logits (and
    # log-probabilities) are reproduced exactly with this count (None: not recorded, by an older version)
    threads: int | None = None
    prompt_tokens: int | None = None  # the prompt tokens of its generated rows (each sample's); None: older records

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DoneRecord:
        return cls(**data)


@dataclass
class Session:
    """One run of the job's driver (a rerun that resumes is another session) and the devices it held: what the job
    cost. Written with `_job.json` at the start, as shards finish and at the end, so a killed run's time counts too."""

    started: float
    seconds: float = 0.0  # wall time so far
    device: str = "cpu"  # the device type: "cpu", or "cuda" with the accelerator type when known ("cuda:H100")
    devices: float = 0.0  # devices held: actors x GPUs each (CPU jobs: actors x CPU cores each)
    device_seconds: float = 0.0  # devices x the seconds they were held (model loading and idle time included)


@dataclass
class JobSpec:
    """`_job.json`: the plan, identity, provenance and state of a generation job."""

    identity: Identity
    output: str
    model: ModelSpec
    files: list[InputFile]
    has_id: bool
    id_type: str  # "int" or "string"
    keep_schema: str  # base64 Arrow schema of the kept columns
    shards: list[ShardPlan]
    versions: dict[str, str]
    format: str = FORMAT
    created: float | None = None
    status: str = "running"  # running | complete | failed | incomplete
    summary: dict | None = None
    failed: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None  # the chat template's text (actors render with exactly this)
    sessions: list[Session] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def engine_config(self, model: str | None = None, *, refill: bool = True, threads: int | None = None):
        """The `EngineConfig` that builds this job's engine exactly: its model, device kind, dtype and shapes. Every
        worker (Ray actor, in-process), `replay` and `verify` build from it.

        Args:
            model: a moved copy of the job's model (default: the job's own source).
            refill: refill finished slots at once (speed only; never changes any text).
            threads: torch CPU threads the worker runs with (None: leave the process's count).

        Raises:
            UserError: the job was made by another version of the engine's arithmetic (it cannot be reproduced).
        """
        numerics = self.identity.engine
        if numerics.version != NUMERICS_VERSION:
            raise UserError(
                f"this job was made by version {numerics.version} of the engine's arithmetic; this aitextgen-batch "
                f"computes version {NUMERICS_VERSION} and cannot reproduce its rows byte for byte. Use the release "
                "that made it to replay or resume it, or rerun it here into a new --output (or with --overwrite)"
            )
        return EngineConfig(
            model=model or self.model.source,
            tokenizer=self.model.tokenizer,
            device=numerics.device,
            dtype=numerics.dtype,
            slots=numerics.slots,
            prefill_rows=numerics.prefill_rows,
            refill=refill,
            threads=threads,
            trust_remote_code=self.model.trust_remote_code,
            allow_pickle=self.model.allow_pickle,
        )

    @classmethod
    def from_json(cls, data: dict) -> JobSpec:
        """Rebuild from `to_json`'s output (a job written by an earlier version reads too: sampling fields it lacks
        take their defaults).

        Raises:
            KeyError, TypeError, UserError: a document of another layout or values (`read_job` reports it).
        """
        ident = dict(data["identity"])
        ident["sampling"] = SamplingParams(**ident["sampling"])
        ident["columns"] = Columns(**ident["columns"])
        ident["engine"] = Numerics(**ident["engine"])
        if ident.get("chat") is not None:
            ident["chat"] = ChatSpec(**ident["chat"])
        if ident.get("requests") is not None:
            ident["requests"] = RequestSpec(**ident["requests"])
        return cls(
            **{
                **data,
                "identity": Identity(**ident),
                "model": ModelSpec(**data["model"]),
                "files": [InputFile(**f) for f in data["files"]],
                "shards": [ShardPlan(**s) for s in data["shards"]],
                "sessions": [Session(**s) for s in data.get("sessions", [])],
            }
        )


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def done_name(shard: int) -> str:
    return f"{DONE_DIR}/{shard:05d}.json"


def staged_name(file_index: int) -> str:
    return f"{INPUTS_DIR}/{file_index:05d}.parquet"


def write_job(out: Location, job: JobSpec) -> None:
    out.write_text(json.dumps(job.to_json(), indent=1, sort_keys=True), JOB_FILE)


def read_job(out: Location) -> JobSpec | None:
    """The job in OUT, or None when OUT holds none.

    Raises:
        UserError: `_job.json` is not valid JSON, or not a job manifest of this version (named, with the fix).
    """
    if not out.exists(JOB_FILE):
        return None
    where = out.uri_of(JOB_FILE)
    try:
        data = json.loads(out.read_text(JOB_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{where} is not valid JSON ({exc}); remove it or pass --overwrite") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{where} has format {got!r}, not {FORMAT!r}; pass --overwrite to start again")
    try:
        return JobSpec.from_json(data)
    except (KeyError, TypeError, UserError) as exc:
        raise UserError(f"{where} is not a complete {FORMAT} manifest ({exc}); pass --overwrite") from exc


def sha256_of(out: Location, name: str) -> str:
    """The sha256 of file `name` in OUT, streamed."""
    sha = hashlib.sha256()
    with out.fs.open_input_stream(out.path(name)) as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def done_record(out: Location, shard: int, sizes: dict[str, int]) -> DoneRecord | None:
    """The completion record of `shard`, or None when the shard must be (re)done.

    None when the record or the part file is missing, the record is unreadable, or the part file's size or sha256
    differs from the record's (truncated, rewritten or corrupted since).

    Args:
        sizes: name -> size of every file in OUT (`Location.sizes(recursive=True)`), listed once by the caller.
    """
    part = part_name(shard)
    if done_name(shard) not in sizes or part not in sizes:
        return None
    try:
        rec = DoneRecord.from_json(json.loads(out.read_text(done_name(shard))))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, TypeError):
        return None
    if rec.bytes != sizes[part] or rec.sha256 != sha256_of(out, part):
        return None
    return rec


def write_done(out: Location, record: DoneRecord) -> None:
    out.write_text(json.dumps(record.to_json(), sort_keys=True), done_name(record.shard))


def clean_tmp(out: Location) -> int:
    """Remove leftovers of interrupted local writes (`.NAME.*.tmp`); returns how many were removed."""
    leftovers = out.list(".tmp") + out.list(pattern=".*.tmp")
    leftovers += out.list(DONE_DIR, pattern=".*.tmp") + out.list(INPUTS_DIR, pattern=".*.tmp")
    for name in leftovers:
        out.delete(name)
    return len(leftovers)


def wipe(out: Location) -> None:
    """--overwrite: remove what a previous job wrote into OUT (and nothing else)."""
    for name in out.list(pattern="part-*.parquet"):
        out.delete(name)
    for name in (DONE_DIR, INPUTS_DIR, JOB_FILE):
        out.delete(name)


def changed_inputs(recorded: list[list], now: list[list]) -> list[str]:
    """What differs between a job's recorded inputs and the inputs now, one phrase per difference (empty: the same).

    A job recorded before input contents were part of its identity has [name, rows] entries: those two are compared.
    """
    if [e[:2] for e in recorded] != [e[:2] for e in now]:
        if [e[0] for e in recorded] != [e[0] for e in now]:
            return [f"input files {[e[0] for e in recorded]} -> {[e[0] for e in now]}"]
        return [f"{a[0]} has {b[1]} rows, the job's had {a[1]}" for a, b in zip(recorded, now) if a[1] != b[1]]
    return [
        f"{a[0]} changed since the job read it ({a[2]} bytes, sha256 {a[3][:12]}... then; {b[2]} bytes, sha256 "
        f"{b[3][:12]}... now)"
        for a, b in zip(recorded, now)
        if len(a) > 2 and a[2:] != b[2:]
    ]


def foreign_files(out: Location, shards: int) -> list[str]:
    """Files in OUT that readers of the folder would take for result rows but that are not the part files of a job of
    `shards` shards (0: a new job, which has none yet). Bookkeeping and hidden names (`_*`, `.*`, at any level) are
    skipped by every reader, so they are never foreign."""
    foreign = []
    for name in out.list(recursive=True) if out.is_dir() else []:
        if any(part.startswith(("_", ".")) for part in name.split("/")):
            continue
        if not (re.fullmatch(r"part-(\d{5})\.parquet", name) and int(name[5:10]) < shards):
            foreign.append(name)
    return foreign


def check_compatible(old: JobSpec, identity: Identity, out: Location) -> None:
    """Refuse to resume into OUT when the job there was made with another model, params, inputs or plan."""
    before, now = dataclasses.asdict(old.identity), dataclasses.asdict(identity)
    edited = changed_inputs(before.pop("inputs"), now.pop("inputs"))
    if edited:
        raise UserError(
            f"{out} holds a job made from other input: {'; '.join(edited[:4])}. Its rows would mix with rows of the "
            "input as it is now: use a new --output, or pass --overwrite to delete its results and start again"
        )
    diffs = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in diffs[:4])
        raise UserError(
            f"{out} holds a job made with a different {', '.join(diffs)} ({detail}). Use a new "
            "--output, or pass --overwrite to delete its results and start again"
        )
