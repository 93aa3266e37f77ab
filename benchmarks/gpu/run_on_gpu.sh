#!/usr/bin/env bash
# The whole GPU check in one call (about 5 minutes on one H100/H200, plus a few for
# train_throughput.py, not timed yet): `lrexport train`'s own throughput (train_throughput.py),
# gpu_check.py, the GPU tests, the quickstart trained on the GPU, exported and verified, and a
# short spatial-wise run. Writes ten files into OUT (default ./gpu-out); prints the reports.
# ONLY=train runs the environment lines and train_throughput.py alone.
#
#     bash benchmarks/gpu/run_on_gpu.sh [OUT]
#     ONLY=train bash benchmarks/gpu/run_on_gpu.sh [OUT]
set -u
out=${1:-gpu-out}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() { echo; echo "### $*"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $py -c 'import torch, torchvision, onnx, onnxruntime as o; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "| torchvision", torchvision.__version__, "| onnx", onnx.__version__, "| onnxruntime", o.__version__, o.get_available_providers())'
} >"$out/gpu_check.log" 2>&1
cat "$out/gpu_check.log"

step "train_throughput.py: lrexport train itself, dense and SVD phases against a plain loop"
timeout 420 $py benchmarks/gpu/train_throughput.py --json "$out/train_throughput.json" --workdir "$work/throughput" \
  >"$out/train_throughput.md" 2>"$out/train_throughput.log"
echo "rc $?"; cat "$out/train_throughput.md"; tail -n 5 "$out/train_throughput.log"
[ "${ONLY:-}" = train ] && exit 0

step "gpu_check.py"
timeout 240 $py benchmarks/gpu/gpu_check.py --json "$out/gpu_check.json" --workdir "$work/check" \
  >"$out/gpu_check.md" 2>>"$out/gpu_check.log"
echo "rc $?"; cat "$out/gpu_check.md"

step "quickstart on the GPU: train, export, verify (onnxruntime CPU; torch on CUDA, fp16, tuned for it)"
run="$work/quickstart"
{
  timeout 180 $py -m lrexport train recipes/quickstart.toml --output "$run" && \
  timeout 90 $py -m lrexport export "$run" && \
  timeout 90 $py -m lrexport verify "$run/artifacts" --runtime ort && \
  timeout 120 $py -m lrexport export "$run" --runtime torch --device cuda --precision fp16 --channels-last \
    --batches 1,32 --output "$run/artifacts-cuda" && \
  timeout 90 $py -m lrexport verify "$run/artifacts-cuda" --device cuda --precision fp16 --channels-last --batches 1,32
} >"$out/quickstart.log" 2>&1
echo "rc $?"; tail -n 40 "$out/quickstart.log"
cp "$run/summary.json" "$out/summary.json" 2>/dev/null
cp "$run/artifacts/verify.json" "$out/verify.json" 2>/dev/null

step "pytest deploy_tests/gpu"
# -o addopts: serially, without pytest-xdist (not installed on the lent machine)
timeout 120 $py -m pytest deploy_tests/gpu -o addopts=-q -rs -p no:cacheprovider >"$out/pytest_gpu.log" 2>&1
echo "rc $?"; tail -n 15 "$out/pytest_gpu.log"

step "quickstart, spatial-wise, shortened, on the GPU"
timeout 120 $py -m lrexport train recipes/quickstart.toml --output "$work/spatial" --set decompose.mode=spatial \
  --set phases.dense.epochs=2 --set phases.svd.epochs=2 --set phases.finetune.epochs=1 >"$out/spatial.log" 2>&1
echo "rc $?"; tail -n 15 "$out/spatial.log"
