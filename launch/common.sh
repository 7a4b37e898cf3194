#!/usr/bin/env bash
# Helpers sourced by the launch scripts (kept in one place so tests can call them directly).

# The first host of a DeepSpeed hostfile ("hostname slots=N" lines), skipping comments and blank lines.
first_host() {
  local hostfile=$1
  [ -f "$hostfile" ] || { echo "hostfile $hostfile not found" >&2; return 1; }
  local host
  host=$(sed -e 's/#.*//' "$hostfile" | awk 'NF { print $1; exit }')
  [ -n "$host" ] || { echo "hostfile $hostfile lists no host (only comments or blank lines)" >&2; return 1; }
  echo "$host"
}

# Number of GPUs this node can see; fails with a clear message when there is none.
visible_gpus() {
  local count
  count=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  if [ "${count:-0}" -lt 1 ]; then
    echo "no GPU is visible on $(hostname) (torch.cuda.device_count() = ${count:-0}; CUDA_VISIBLE_DEVICES=" \
         "${CUDA_VISIBLE_DEVICES-unset}): set NGPUS, or run on a GPU node" >&2
    return 1
  fi
  echo "$count"
}

# The DeepSpeed launcher starts ranks over ssh with a bare environment; it exports the variables listed in
# ./.deepspeed_env on every node. Write the ones set here (caches, offline flags, wandb, NCCL), unless the
# user already keeps such a file.
DEEPSPEED_ENV_VARS="HF_HOME HF_HUB_OFFLINE HF_DATASETS_CACHE TRANSFORMERS_OFFLINE TRANSFORMERS_CACHE TORCH_HOME
 WANDB_API_KEY WANDB_MODE WANDB_PROJECT WANDB_ENTITY WANDB_DIR TRITON_CACHE_DIR PYTHONPATH
 NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_NET_GDR_LEVEL NCCL_P2P_DISABLE"
write_deepspeed_env() {
  local file=${1:-.deepspeed_env}
  if [ -f "$file" ]; then
    echo "using the existing $file" >&2
    return 0
  fi
  local name written=0
  for name in $DEEPSPEED_ENV_VARS; do
    if [ -n "${!name+x}" ]; then
      printf '%s=%s\n' "$name" "${!name}" >> "$file"
      written=$((written + 1))
    fi
  done
  [ "$written" -eq 0 ] || echo "wrote $written variable(s) to $file for the remote ranks" >&2
}
