"""The output's columns: the explicit Arrow schema of every result shard (`part-NNNNN.parquet`), in one place.

A shard writer, `verify` and the flags' checks (a kept column may not take an output column's name) read it from here.
"""

from __future__ import annotations

from .manifest import JobSpec

BASE_FIELDS = [
    ("sample_index", "int32"),
    ("prompt", "string"),
    ("seed", "int64"),
    ("text", "string"),
    ("num_prompt_tokens", "int32"),
    ("num_generated_tokens", "int32"),
    ("finish_reason", "string"),
    ("error", "string"),
    ("valid", "bool_"),  # structured output: the text satisfies the row's constraint (null without one)
]
PARAMS_FIELD = "params"  # with --params-column: each row's effective SamplingParams, as JSON
LOGPROB_FIELDS = ["cumulative_logprob"]  # with --logprobs
TOKEN_FIELDS = ["token_ids", "token_logprobs"]  # with --return-tokens
TOP_FIELD = "top_logprobs"  # with --top-logprobs K (or per-row params, where a row may ask)
PROMPT_FIELD = "prompt_logprobs"  # with --prompt-logprobs (or per-row params)


def optional_fields(
    params: bool, logprobs: bool, return_tokens: bool, top_logprobs: bool = False, prompt_logprobs: bool = False
) -> list[str]:
    """The output columns a job has beyond BASE_FIELDS, in order (a job with per-row params has the top and prompt
    log-probability columns whatever its flags say, since any row may ask: `GenerateConfig.logprob_columns`)."""
    return (
        [PARAMS_FIELD] * params
        + LOGPROB_FIELDS * logprobs
        + TOKEN_FIELDS * return_tokens
        + [TOP_FIELD] * top_logprobs
        + [PROMPT_FIELD] * prompt_logprobs
    )


def logprob_columns(sampling, per_row: bool) -> tuple[bool, bool]:
    """Whether the output has top_logprobs and prompt_logprobs: when the job's `SamplingParams` ask, or when rows have
    their own params (`per_row`: any row may ask)."""
    return sampling.top_logprobs > 0 or per_row, sampling.prompt_logprobs or per_row


def output_names(optional: list[str]) -> set[str]:
    """The names of the output columns a kept input column may not take: id, BASE_FIELDS and `optional`."""
    return {"id", *(name for name, _ in BASE_FIELDS), *optional}


def job_fields(ident) -> list[str]:
    """`optional_fields` of a job's identity: the columns it recorded (a job of an earlier version has no top or prompt
    log-probabilities, and is resumed without them)."""
    return optional_fields(
        bool(ident.columns.params), ident.logprobs, ident.return_tokens, ident.top_logprobs, ident.prompt_logprobs
    )


def output_schema(job: JobSpec):
    """The explicit schema of every result shard: id, the generation fields, the optional ones, the kept columns."""
    import pyarrow as pa

    ident = job.identity
    types = {
        PARAMS_FIELD: pa.string(),
        "cumulative_logprob": pa.float64(),
        "token_ids": pa.list_(pa.int32()),
        "token_logprobs": pa.list_(pa.float32()),
        TOP_FIELD: pa.list_(pa.list_(pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())]))),
        PROMPT_FIELD: pa.list_(pa.float32()),
    }
    fields = [pa.field("id", pa.int64() if job.id_type == "int" else pa.string(), nullable=False)]
    fields += [pa.field(name, getattr(pa, t)()) for name, t in BASE_FIELDS]
    fields += [pa.field(name, types[name]) for name in job_fields(ident)]
    kept = keep_schema(job)
    fields += [kept.field(c) for c in ident.columns.keep]
    return pa.schema(fields, metadata={"aitextgen_batch.fingerprint": ident.model_fingerprint})


def keep_schema(job: JobSpec):
    """The input types of the kept columns, stored in the manifest as a serialized Arrow schema."""
    import base64

    import pyarrow as pa

    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(job.keep_schema)))


def encode_keep_schema(schema) -> str:
    """A `pyarrow.Schema` of kept columns as the manifest stores it (`JobSpec.keep_schema`): base64 Arrow IPC."""
    import base64

    return base64.b64encode(schema.serialize().to_pybytes()).decode()
