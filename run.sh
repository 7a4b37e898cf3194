#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs a job:
#   ./run.sh demo [args]   - the embedded demo (no downloads)
#   ./run.sh test [args]   - the test suite
#   ./run.sh bench [args]  - the training-step benchmark
#   ./run.sh <cmd> [args]  - any command inside the project's virtual environment
# The environment lives in .venv (override with UNIGENDET_VENV) and is rebuilt when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${UNIGENDET_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"

if [ ! -f "$STAMP" ]; then
  echo "[run.sh] setting up $VENV (first run takes a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The CPU wheel of torch 2.13.0 lies on disk here; an unpinned torch would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[train,eval,demo,serve,test]"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi

export PATH="$PWD/$VENV/bin:$PATH"
# DeepSpeed compiles its CPU communication op on first use into TORCH_EXTENSIONS_DIR. A directory per environment:
# the default (~/.cache) is shared by every checkout, and each rebuilt it for its own include paths while other
# checkouts' processes were loading it.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}"
cmd=${1:-test}
shift || true
case "$cmd" in
  demo)  exec unigendet demo "$@" ;;
  test)  # Built once before the tests start, so that the test processes only load it.
         DS_ACCELERATOR=cpu python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
         exec python -m pytest -q -n 2 "$@" ;;
  bench) exec python benchmarks/train_step.py "$@" ;;
  *)     exec "$cmd" "$@" ;;
esac
