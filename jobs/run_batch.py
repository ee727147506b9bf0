"""Ray job entrypoint for an OpenAI batch file; the same flags as `aitextgen-batch run-batch`.

Submit to a running cluster (Ray sets RAY_ADDRESS for the job). Paths are read on the cluster, so give absolute (or
s3://) paths:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/run_batch.py \
        -i /data/requests.jsonl -o /data/results.jsonl --model /data/model

Run locally (starts a local Ray):

    python jobs/run_batch.py -i requests.jsonl -o results.jsonl
"""

import sys

from aitextgen_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["run-batch", *sys.argv[1:]]))
