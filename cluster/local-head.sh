#!/usr/bin/env bash
# A one-machine Ray cluster for aitextgen-batch: the head bound to 127.0.0.1, the dashboard (job API) on loopback
# only, token auth on. It uses the project's own environment (.venv, made by `make venv`) whether or not it is
# activated; without one, the `ray` on PATH (or RAY=/path/to/ray):
#
#   cluster/local-head.sh                      # start; returns once the head is up
#   aitextgen-batch submit -- generate --model /data/model --input /data/prompts --output /data/results
#   ray stop                                   # stop (note: stops every Ray process of this machine)
#
# What a user changes:
#   NUM_CPUS=8 cluster/local-head.sh           # CPUs Ray may use (default: all cores)
#   cluster/local-head.sh --num-gpus 1         # any further flags go to `ray start` (--port, --dashboard-port,
#                                              # --temp-dir, --block, ...)
#
# Token auth: the token is ~/.ray/auth_token (made here once if missing; RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH
# override it). `aitextgen-batch submit` on this machine finds it by itself; Ray's own CLI needs
# `RAY_AUTH_MODE=token` exported to send it. Ray still gives the GCS and raylet ports the machine's address (it
# rewrites 127.0.0.1 so that other nodes could join): the token is what guards them, so keep it on.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${RAY:-}" ]; then
    if [ -x "$REPO/.venv/bin/ray" ]; then
        RAY="$REPO/.venv/bin/ray"
    elif command -v ray >/dev/null 2>&1; then
        RAY=ray
    else
        echo "local-head.sh: no Ray found: run \`make venv\` in $REPO first (or set RAY=/path/to/ray)" >&2
        exit 1
    fi
fi
NUM_CPUS="${NUM_CPUS:-$(nproc)}"
# Jobs run `python` from the head's PATH: make it the Python of this `ray` (e.g. RAY=.venv/bin/ray without activating).
PATH="$(dirname "$(command -v "$RAY")"):$PATH"
export PATH

# Make the token once (printed by Ray, so keep it off the terminal); RAY_AUTH_MODE=token then makes `ray start`
# fail rather than start an open cluster if no token can be found.
"$RAY" get-auth-token --generate >/dev/null 2>&1
export RAY_AUTH_MODE=token

exec "$RAY" start --head \
    --node-ip-address 127.0.0.1 \
    --dashboard-host 127.0.0.1 \
    --num-cpus "$NUM_CPUS" \
    "$@"
