"""Ray job entrypoint for batch generation; the same flags as `aitextgen-batch generate`.

Submit to a running cluster (Ray sets RAY_ADDRESS for the job, so no --address is needed):

    ray job submit --working-dir . -- python jobs/generate.py \
        --model path/to/model --input prompts/ --output results/ --max-new-tokens 64

Run locally (starts a local Ray):

    python jobs/generate.py --model path/to/model --input prompts.parquet --output results/
"""

import sys

from aitextgen_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
