#!/usr/bin/env bash
# Run on every node. NNODES nodes x NPROC_PER_NODE ranks: one tensor-parallel group over all of them, or,
# with TP set, replicas of a TP-way group (a (dp, tp) mesh; TP must divide the job's ranks).
# Required: MASTER_ADDR (node 0's address), NODE_RANK; optional: NNODES, NPROC_PER_NODE, MASTER_PORT,
# TP (the tensor-parallel degree; default: every rank), SHARE (none, or job: the replicas split the reading of
# the checkpoint and exchange the shards, so each byte leaves the shared storage once per job).
# Every node must see the same checkpoint files (shared filesystem, or the same Hub cache contents:
# with a Hub id, the first rank of each node downloads to that node's cache).
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR}" "${NODE_RANK:?set NODE_RANK}"
mesh_args=()
[[ -n ${TP:-} ]] && mesh_args+=(--tp "$TP")
[[ -n ${SHARE:-} ]] && mesh_args+=(--share "$SHARE")
exec torchrun \
  --nnodes "${NNODES:-2}" --node-rank "$NODE_RANK" --nproc-per-node "${NPROC_PER_NODE:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
  -m tp_loader ${mesh_args[@]+"${mesh_args[@]}"} "$@"
