#!/usr/bin/env bash
# Several nodes through a DeepSpeed hostfile (lines "hostname slots=8"; comments and blank lines allowed); run
# on the first node:
#   HOSTFILE=hostfile CONFIG=configs/train/gduf_bagel7b.yaml launch/multi_node.sh init.path=...
# Every node must see the repository, the data and the checkpoint directory at the same relative paths (shared
# filesystem); the launcher starts the same command on each host over ssh with a bare environment, so the
# cache/wandb/NCCL variables set here are written to ./.deepspeed_env, which it exports on every node.
set -euo pipefail
source "$(dirname "$0")/common.sh"
CONFIG=${CONFIG:?set CONFIG to a YAML under configs/train/}
HOSTFILE=${HOSTFILE:?set HOSTFILE (lines: <hostname> slots=<gpus>)}
ENTRY=${ENTRY:-train/gduf.py}
MASTER_ADDR=${MASTER_ADDR:-$(first_host "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
write_deepspeed_env .deepspeed_env
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  "$ENTRY" --config "$CONFIG" "$@"
