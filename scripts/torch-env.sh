# shellcheck shell=bash
# Sourced by scripts: lets tch build against, and run with, the torch that pip installed.
export LIBTORCH_USE_PYTORCH=1
TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)" || {
  echo "error: python3 cannot import torch; run: python3 -m pip install -r requirements-dev.txt" >&2
  # shellcheck disable=SC2317 # exit is reached when the file is run, not sourced
  return 1 2>/dev/null || exit 1
}
export LD_LIBRARY_PATH="${TORCH_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
