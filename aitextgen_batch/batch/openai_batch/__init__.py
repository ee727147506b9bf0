"""The OpenAI batch format in and out: `aitextgen-batch run-batch -i requests.jsonl -o results.jsonl`.

`requests` reads a request file (one `{"custom_id", "method", "url", "body"}` line per request, the format of the
OpenAI Batch API, `vllm run-batch`, SGLang and LiteLLM) into the rows of an ordinary job (`--input-format
openai-batch`); the job runs as every job does (sharded, resumable, exactly once, `verify` and `replay` by
`custom_id`); `results` writes the results file from its finished shards; `command` is the `run-batch` command.
"""
