#!/usr/bin/env bash
# Distributed training on one machine with torchrun (one process per GPU, or NPROC CPU processes).
#
# Usage:  launch/torchrun_single_node.sh CONFIG [NPROC] [-- --set key=value ...]
#   launch/torchrun_single_node.sh prmkd_dist/configs/sasrec-ml.yaml 2
#   launch/torchrun_single_node.sh quickstart 2 -- --set parallel.zero_stage=2 optim.batch_size=128
# Env: PYTHON (default .venv/bin/python if present, else python), MASTER_PORT (default 29500),
#      MAX_RESTARTS (default 0; >0 restarts the whole group after a failure, the run resumes from
#      <out_dir>/dist_checkpoint/latest).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [NPROC] [-- extra args]}; shift
NPROC=${1:-2}; [[ $# -gt 0 ]] && shift
[[ ${1:-} == "--" ]] && shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$([[ -x $ROOT/.venv/bin/python ]] && echo "$ROOT/.venv/bin/python" || echo python)}
# c10d rendezvous (not the static master port): each restart gets a fresh store
exec "$PYTHON" -m torch.distributed.run --nnodes 1 --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:${MASTER_PORT:-29500}" --rdzv-id "prmkd-$$" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  -m prmkd_dist.parallel.run --config "$CONFIG" "$@"
