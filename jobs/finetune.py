"""Ray job entrypoint for finetuning; the same flags as `aitextgen-batch finetune`.

Submit to a running cluster (Ray sets RAY_ADDRESS for the job, so no --address is needed). OUTPUT must be on storage
every node sees (it is Ray Train's run storage too); rerun the same command to resume after a failure:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/finetune.py \
        --model /data/model --dataset /data/cache --output /data/out \
        --num-workers 4 --use-gpu --precision bf16-mixed --max-steps 5000 --batch-size 8 --block-size 1024

(RAY_AUTH_MODE=token makes the `ray` client send the head's token; `aitextgen-batch submit --address URL --
finetune ...` finds the token itself.) Run locally (starts a local Ray):

    python jobs/finetune.py --model path/to/model --dataset cache/ --output out/ --num-workers 2 --max-steps 500
"""

import sys

from aitextgen_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
