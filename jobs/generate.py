"""Ray job entrypoint for batch generation; the same flags as `aitextgen-batch generate`.

Submit to a running cluster (Ray sets RAY_ADDRESS for the job, so no --address is needed). Ray 2.60 heads use
token auth: the `ray` client sends the token (from RAY_AUTH_TOKEN or ~/.ray/auth_token) only with
RAY_AUTH_MODE=token. Paths are read on the cluster, so give absolute (or s3://) paths:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/generate.py \
        --model /data/model --input /data/prompts/ --output /data/results/ --max-new-tokens 64

or, with the token found for you: `aitextgen-batch submit --address http://127.0.0.1:8265 -- generate ...`.

Run locally (starts a local Ray):

    python jobs/generate.py --model path/to/model --input prompts.parquet --output results/
"""

import sys

from aitextgen_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
