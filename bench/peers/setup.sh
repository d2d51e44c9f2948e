#!/usr/bin/env bash
# Install the peers that bench/peers/run.py compares massmerge with, each in its own virtual environment:
#   bench/peers/.venvs/fusion-bench  (PyPI fusion-bench)
#   bench/peers/.venvs/mergekit      (PyPI mergekit)
# Optional and by hand only: never part of CI or of the README's set-up. torch==2.13.0 (the CPU build massmerge
# uses) goes in FIRST in each venv, otherwise pip resolves a multi-GB CUDA build as the peers' torch dependency.
# Usage: bash bench/peers/setup.sh [fusion-bench] [mergekit]   (default: both); FUSION_BENCH_VERSION and
# MERGEKIT_VERSION pin versions (default: the newest on the index).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venvs="$here/.venvs"
python="${PYTHON:-python3}"
torch_spec="torch==2.13.0"
peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(fusion-bench mergekit)

install_peer() {
  local name="$1" spec="$2" venv="$venvs/$1"
  echo "== $name -> $venv" >&2
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "$torch_spec"
  "$venv/bin/python" -m pip install --quiet "$spec" "$torch_spec"
  "$venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  "$venv/bin/python" -m pip show "$name" | sed -n '1,2p' >&2
}

for peer in "${peers[@]}"; do
  case "$peer" in
    fusion-bench) install_peer fusion-bench "fusion-bench${FUSION_BENCH_VERSION:+==$FUSION_BENCH_VERSION}" ;;
    mergekit) install_peer mergekit "mergekit${MERGEKIT_VERSION:+==$MERGEKIT_VERSION}" ;;
    *) echo "unknown peer '$peer' (choose fusion-bench, mergekit)" >&2; exit 2 ;;
  esac
done
