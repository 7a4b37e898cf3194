#!/usr/bin/env bash
# One node, NGPUS GPUs (default: all visible), DeepSpeed launcher.
#   CONFIG=configs/train/gduf_bagel7b.yaml NGPUS=8 launch/single_node.sh init.path=ckpts/BAGEL-7B-MoT
# Extra arguments are dotted config overrides. ENTRY picks the stage script (train/gduf.py, train/diga.py).
set -euo pipefail
source "$(dirname "$0")/common.sh"
CONFIG=${CONFIG:?set CONFIG to a YAML under configs/train/}
ENTRY=${ENTRY:-train/gduf.py}
NGPUS=${NGPUS:-$(visible_gpus)}
MASTER_PORT=${MASTER_PORT:-29500}
exec deepspeed --num_gpus "$NGPUS" --master_port "$MASTER_PORT" "$ENTRY" --config "$CONFIG" "$@"
