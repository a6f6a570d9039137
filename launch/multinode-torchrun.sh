#!/usr/bin/env bash
# Run on every node. NNODES nodes x NPROC_PER_NODE ranks form one tensor-parallel group.
# Required: MASTER_ADDR (node 0's address), NODE_RANK; optional: NNODES, NPROC_PER_NODE, MASTER_PORT.
# Every node must see the same checkpoint files (shared filesystem, or the same Hub cache contents:
# with a Hub id, the first rank of each node downloads to that node's cache).
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR}" "${NODE_RANK:?set NODE_RANK}"
exec torchrun \
  --nnodes "${NNODES:-2}" --node-rank "$NODE_RANK" --nproc-per-node "${NPROC_PER_NODE:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
  -m tp_loader "$@"
