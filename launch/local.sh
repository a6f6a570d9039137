#!/usr/bin/env bash
# Load MODEL (default: the demo checkpoint) on NPROC local ranks.
# Usage: launch/local.sh [NPROC] [MODEL] [tp_loader options...]
set -euo pipefail
nproc=${1:-2}
shift || true
exec torchrun --standalone --nproc-per-node "$nproc" -m tp_loader "$@"
