#!/usr/bin/env bash
# Several nodes through a DeepSpeed hostfile (lines "hostname slots=8"); run on the first node.
#   HOSTFILE=hostfile CONFIG=configs/train/gduf_bagel7b.yaml launch/multi_node.sh init.path=...
# Every node must see the repository, the data and the checkpoint directory at the same relative
# paths (shared filesystem); the launcher starts the same command on each host over ssh.
set -euo pipefail
CONFIG=${CONFIG:?set CONFIG to a YAML under configs/train/}
HOSTFILE=${HOSTFILE:?set HOSTFILE (lines: <hostname> slots=<gpus>)}
ENTRY=${ENTRY:-train/gduf.py}
MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}
MASTER_PORT=${MASTER_PORT:-29500}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  "$ENTRY" --config "$CONFIG" "$@"
