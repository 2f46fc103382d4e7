#!/usr/bin/env bash
# The same entry point under DeepSpeed's launcher (pdsh/ssh to the hosts of a hostfile, or local).
#
# Usage:  launch/deepspeed_launch.sh CONFIG [HOSTFILE] [-- extra args]
#   local, 2 processes:       NUM_PROCS=2 launch/deepspeed_launch.sh quickstart
#   hosts of a hostfile:      launch/deepspeed_launch.sh sasrec-ml launch/hostfile.example
#   ZeRO config from a file:  launch/deepspeed_launch.sh sasrec-ml -- --set parallel.ds_config=launch/ds_zero2.json
# The launcher sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT and passes --local_rank (accepted).
# Without GPUs set NUM_PROCS (the launcher otherwise counts GPUs); DS_ACCELERATOR=cpu is set then.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [HOSTFILE] [-- extra args]}; shift
HOSTFILE=""
if [[ $# -gt 0 && $1 != "--" ]]; then HOSTFILE=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEEPSPEED=${DEEPSPEED:-$([[ -x $ROOT/.venv/bin/deepspeed ]] && echo "$ROOT/.venv/bin/deepspeed" || echo deepspeed)}
ARGS=(--master_port "${MASTER_PORT:-29500}")
if [[ -n $HOSTFILE ]]; then
  ARGS+=(--hostfile "$HOSTFILE")
else
  ARGS+=(--num_gpus "${NUM_PROCS:-1}")
  command -v nvidia-smi >/dev/null || export DS_ACCELERATOR=cpu
fi
exec "$DEEPSPEED" "${ARGS[@]}" --module prmkd_dist.parallel.run --config "$CONFIG" "$@"
