#!/usr/bin/env bash
# Distributed training over several machines with torchrun's c10d rendezvous. Run the SAME command on
# every node (node order does not matter; the rendezvous assigns ranks).
#
# Usage:  launch/torchrun_multi_node.sh CONFIG NNODES NPROC_PER_NODE RDZV_HOST:PORT [RDZV_ID] [-- extra args]
#   node A:  launch/torchrun_multi_node.sh sasrec-ml 2 8 10.0.0.1:29400 job42
#   node B:  launch/torchrun_multi_node.sh sasrec-ml 2 8 10.0.0.1:29400 job42
#   two "nodes" on one machine (what tests do): run both lines with 127.0.0.1:29400 and 1 proc each.
# RDZV_HOST must be reachable from every node (any of them; it hosts the rendezvous store).
# Env: PYTHON, MAX_RESTARTS (default 0), NCCL/GLOO_SOCKET_IFNAME as your network needs.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG NNODES NPROC_PER_NODE HOST:PORT [RDZV_ID] [-- extra args]}
NNODES=${2:?}; NPROC=${3:?}; ENDPOINT=${4:?}; shift 4
RDZV_ID=${1:-prmkd}; [[ $# -gt 0 && $1 != "--" ]] && shift
[[ ${1:-} == "--" ]] && shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$([[ -x $ROOT/.venv/bin/python ]] && echo "$ROOT/.venv/bin/python" || echo python)}
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$ENDPOINT" --rdzv-id "$RDZV_ID" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  -m prmkd_dist.parallel.run --config "$CONFIG" "$@"
