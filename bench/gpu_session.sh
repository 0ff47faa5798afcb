#!/usr/bin/env bash
# One device run that measures npctalk's CUDA path, for a session lent a GPU (see issue #3).
#
# Prerequisite: onnxruntime-gpu and the export stack installed into /tmp/site on the GPU machine by
# ../shared/device/prepare.sh's seven runs (the machine forgets them when it is handed back, so run
# this right after, on the same warm machine). Then, from the repository root:
#
#     bash bench/gpu_session.sh            # writes everything under $OUT (or /tmp/gpu-out)
#
# Steps, each under its own time limit so one failure does not eat the device time:
#   1. providers, the GPU, and npctalk importable from this checkout (a shim, no pip install)
#   2. a lean fp16 export of DialoGPT-medium (random weights, exact config) on CUDA, validated
#      against PyTorch on CUDA, with ONNX Runtime's node placement logged (every node on CUDA?)
#   3. bench/decode.py on CUDA: DialoGPT-small/medium/large and SmolLM2-135M, lean fp16, batch 1
#      and 16, HF PyTorch fp16 generate() as the peer in the same run
#   4. bench/concurrency.py through the real socket on CUDA: DialoGPT-medium, 1/8/32/64 streams
# Results: $OUT/results/*.{json,md} (commit them with the device name), $OUT/*.log.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT/results"
SHIM=/tmp/npctalk-shim
mkdir -p "$SHIM/npctalk"
for pair in engine:engine export:export client:bindings/python finetune:finetune demo:demo_game; do
    ln -sfn "$PWD/${pair#*:}" "$SHIM/npctalk/${pair%%:*}"
done
export PYTHONPATH=/tmp/site:$SHIM:$PWD
WORK=/tmp/gpu-work

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, never stop the script
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? ($(tail -n 1 "$OUT/$name.log" | cut -c1-160))"
}

step 1-providers 60 python - <<'PY'
import onnxruntime as ort
ort.preload_dlls()
print("onnxruntime", ort.__version__, ort.get_available_providers())
import torch
print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")
from npctalk.engine.model import Model  # importable from the shim
print("npctalk importable")
PY

step 2-export-medium-fp16 240 python - "$WORK" <<'PY'
import logging, sys
from pathlib import Path
import onnxruntime as ort
ort.preload_dlls()
logging.basicConfig(level=logging.INFO)
from bench.decode import build_hf_folder
from npctalk.export.api import ExportOptions, export_bundle
work = Path(sys.argv[1])
folder = build_hf_folder("dialogpt-medium", work)
bundle = export_bundle(folder, work / "medium-lean-fp16-cuda", ExportOptions(dtype="fp16", device="cuda", graph="lean"))
options = ort.SessionOptions()
options.log_severity_level = 1  # INFO: ONNX Runtime says which nodes it placed on the CPU
session = ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("providers in use:", session.get_providers())
PY

step 3-decode-cuda 420 python -m bench.decode --device cuda --models dialogpt-small dialogpt-medium dialogpt-large smollm2-135m \
    --dtypes fp16 --graphs lean --streams 1 16 --peers hf --repeats 2 --no-default --work "$WORK" --out "$OUT/results" \
    --note "H100 lent to the session; bench/gpu_session.sh step 3"

step 4-concurrency-cuda 300 python bench/concurrency.py --model "$WORK/bundles/dialogpt-medium-lean-fp16-cuda" \
    --provider cuda --streams 1 8 32 64 --max-new-tokens 128 --out "$OUT/results"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
ls -la "$OUT" "$OUT/results"
