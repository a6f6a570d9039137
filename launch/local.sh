#!/usr/bin/env bash
# Load MODEL (default: the demo checkpoint) on NPROC ranks of this machine.
#
# Usage: launch/local.sh [MODEL] [-n NPROC] [tp_loader options...]
#
#   MODEL        a checkpoint directory or a Hub repository id (org/name); omitted: the demo checkpoint
#   -n NPROC     ranks to start (also --nproc NPROC, or the NPROC environment variable); default: the
#                number of GPUs nvidia-smi lists, else 2 (CPU, gloo)
#   options      passed to `python -m tp_loader` as they are: --dtype, --plan, --mode, --report PATH,
#                --strict, -q, -v, ... (see `python -m tp_loader --help`)
#
# Examples:
#   launch/local.sh                                   # the demo checkpoint on 2 ranks (or one per GPU)
#   launch/local.sh /models/Llama-3.1-8B --dtype bfloat16
#   launch/local.sh Qwen/Qwen3-0.6B -n 4 --report report.json
#   NPROC=4 launch/local.sh -q --report report.json   # the demo checkpoint, quietly, on 4 ranks
#
# The older form with NPROC first (`launch/local.sh 2 MODEL ...`) still works: a first argument that
# is a whole number and not an existing path is taken as NPROC.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

nproc=${NPROC:-}
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ && ! -e $1 ]]; then
  nproc=$1
  shift
fi
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -n | --nproc)
      [[ $# -ge 2 ]] || { echo "local.sh: $1 needs a number of ranks" >&2; exit 2; }
      nproc=$2
      shift 2
      ;;
    --nproc=*)
      nproc=${1#--nproc=}
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      args+=("$1")
      shift
      ;;
  esac
done
if [[ -z $nproc ]]; then
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
  nproc=$(( ${gpus:-0} > 0 ? gpus : 2 ))
fi
if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: NPROC must be a positive whole number, got '$nproc'" >&2
  exit 2
fi
exec torchrun --standalone --nproc-per-node "$nproc" -m tp_loader ${args[@]+"${args[@]}"}
