#!/usr/bin/env bash
# benchmarks/gpu.sh: tp_loader's CUDA path on a machine with NVIDIA GPUs, in one command.
#
#   bash benchmarks/gpu.sh                                  # a short sweep, results in /tmp/tp_loader_gpu
#   bash benchmarks/gpu.sh --reps 5 --buffer-mib 4 16 32 128 --threads 1 2 4 --out DIR --data DIR
#
# 1. Fails loudly (exit 1, the reason on stderr) when nvidia-smi is missing, lists no GPU, or torch.cuda is
#    unavailable (a CPU build of torch, no driver); then prints each GPU's name and memory (nvidia-smi).
# 2. On one card (the first visible, CUDA_VISIBLE_DEVICES), `python -m benchmarks.cuda --require-gpu`: tp_loader's
#    load through its pinned staging ring for a few ring settings, the raw pageable read + .to("cuda"), and a raw
#    pinned copy (preadv into pinned tensors, then .to("cuda", non_blocking=True)) measured in the same run.
#    Options given to this script are passed on to it (later ones override the short defaults below); --out and
#    --data are read here too. It writes cuda.md and cuda.json in --out (default /tmp/tp_loader_gpu) and generates
#    the 1 GB benchmark checkpoint under --data (default $TP_LOADER_BENCH_DIR, else /tmp/tp_loader_bench) if absent.
# 3. With more than one GPU: `torchrun --standalone --nproc-per-node N -m tp_loader DATA/base --device cuda` at
#    TP = N over NCCL, its report (--report) in OUT/torchrun_tpN.json, and each rank's seconds printed from it.
#    The share mode is $GPU_SHARE (default none): tp_loader refuses share="job" for CUDA shards for now (its
#    exchange runs over gloo on CPU tensors; tp_loader/arguments.py normalise_share), and at TP = N there is one
#    group and no replica to share with. GPU_SHARE=job runs it anyway, to see that refusal or, later, its support.
# 4. Last line: "H2D: tp_loader X GB/s = Y of raw pinned Z GB/s (...)", the sweep's fastest ring setting end to end
#    (bytes / load seconds) as a fraction of the raw pinned copy's host-to-device throughput.
#
# Needs: an NVIDIA GPU and driver (nvidia-smi), the venv the README sets up with a CUDA build of torch
# (.venv/bin/python if present, else python on PATH), and about 1 GB free under --data (the checkpoint).
set -euo pipefail

die() {
    echo "benchmarks/gpu.sh: error: $*" >&2
    exit 1
}
trap 'echo "benchmarks/gpu.sh: error: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi

out=/tmp/tp_loader_gpu
data=${TP_LOADER_BENCH_DIR:-/tmp/tp_loader_bench}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --out) out=${args[i + 1]:-$out} ;;
        --out=*) out=${args[i]#--out=} ;;
        --data) data=${args[i + 1]:-$data} ;;
        --data=*) data=${args[i]#--data=} ;;
    esac
done

command -v nvidia-smi >/dev/null 2>&1 ||
    die "nvidia-smi not found on PATH: no NVIDIA driver on this machine. This script needs an NVIDIA GPU"
gpus=$(nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>&1) ||
    die "nvidia-smi lists no GPU (exit $?): ${gpus:-no output}"
[[ -n $gpus ]] || die "nvidia-smi lists no GPU (empty output)"
echo "GPUs (nvidia-smi: index, name, memory):"
echo "$gpus"

torch_info=$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(),
torch.cuda.device_count())') || die "$PY could not import torch (its error above)"
read -r torch_version torch_cuda cuda_available num_gpus <<<"$torch_info"
[[ $cuda_available == True && $num_gpus -gt 0 ]] ||
    die "torch.cuda is unavailable to $PY: torch $torch_version, torch.version.cuda $torch_cuda," \
        "torch.cuda.is_available() $cuda_available, torch.cuda.device_count() $num_gpus" \
        "(a CPU build of torch, or a driver torch cannot use)"
echo "torch $torch_version, CUDA $torch_cuda, $num_gpus GPUs visible to torch"

first=${CUDA_VISIBLE_DEVICES:-0}
first=${first%%,*}
echo
echo "== one card (CUDA_VISIBLE_DEVICES=$first): python -m benchmarks.cuda --require-gpu"
CUDA_VISIBLE_DEVICES=$first "$PY" -m benchmarks.cuda --require-gpu --out "$out" \
    --reps 2 --buffer-mib 8 32 128 --threads 1 2 "$@"

if ((num_gpus > 1)); then
    share=${GPU_SHARE:-none}
    report=$out/torchrun_tp$num_gpus.json
    echo
    echo "== TP $num_gpus over NCCL: torchrun -m tp_loader $data/base --device cuda --share $share"
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$num_gpus" \
        -m tp_loader "$data/base" --device cuda --share "$share" --report "$report"
    "$PY" - "$report" <<'EOF'
import json
import sys

report = json.load(open(sys.argv[1]))
for r in report["ranks"]:
    rate = r["bytes_planned"] / r["seconds"] / 1e9 if r["seconds"] else float("nan")
    print(
        f"rank {r['rank']}: {r['seconds']:.3f} s from the call to the report (read {r['read_seconds']:.3f} s), "
        f"{r['bytes_planned'] / 1e9:.2f} GB planned, {rate:.2f} GB/s"
    )
print(f"slowest rank {report['seconds']:.3f} s for {report['bytes_planned'] / 1e9:.2f} GB in all")
EOF
else
    echo
    echo "== one GPU: no multi-rank (NCCL) load"
fi

echo
"$PY" -c 'import json, sys; from benchmarks.cuda import summary; print(summary(json.load(open(sys.argv[1]))))' \
    "$out/cuda.json"
