#!/usr/bin/env bash
# One device run that measures npctalk's CUDA fast path (issue #3), for a session lent a GPU.
#
# Prerequisite: onnxruntime-gpu and the export stack in /tmp/site on the GPU machine
# (../shared/device/prepare.sh's runs; the machine forgets them when it is handed back). Then,
# from the repository root:   bash bench/gpu_session.sh        (results under $OUT, else /tmp/gpu-out)
#
# Every step has its own time limit and the results so far are packed into $OUT/gpu-results.tgz
# after each one, so a step that hangs or a run cut short still returns everything before it:
#   env         GPU, versions, ONNX Runtime's providers
#   decode-*    bench/decode.py per architecture (DialoGPT-medium first: the target), lean fp16
#               slots bundles exported and validated on CUDA, the slot decoder with and without the
#               CUDA graph, HF PyTorch fp16 generate() in the same run, batch 1/16/64 (16/64 also with
#               the prompts read together: -together rows), and the first token of a 256-token prompt
#   kernels-*   bench/kernel_times.py: each CUDA kernel's time in a decode step at 1 and 64 rows (ncu)
#   checks      bench/gpu_checks.py on the DialoGPT-medium bundle: node placement, device memory,
#               CUDA-graph token parity, prompts read together against one by one, persona-prefix
#               snapshots (placement, parity, copy time against reading the prefix), and a burst's
#               reads: cached turns alone against whole prompts together (--group-cached-prompts)
#   concurrency bench/concurrency.py: npctalk serve on that bundle (the slot decoder), 1/8/32/64
#               streams through the real socket (issue #4), greedy, then with the default sampling
#               from each row's top 64 logits and from whole rows (--top-tokens 64 / 0, one after the other);
#               the greedy run again with a 4096-token prefill budget per step (a burst's prompts are
#               read together, up to that many tokens a step, instead of 512: TTFT against gaps);
#               (the server times a burst of cached-prefix says read alone and together at start and
#               takes the cheaper: its log, concurrency-server.log, says which); the greedy run again
#               with every cached-prefix say's turn read alone (--group-cached-prompts=off; tag alone:
#               the paced CPU run predicts 11.6k alone against 13.5k together at 64 streams);
#               the greedy run again without the persona prefix cache (--prefix-cache-mb 0: every
#               prompt read whole, as before snapshots on slots; tag noprefix);
#               the greedy run again with serve --decode-ahead (the next step on a worker thread);
#               and a steady state (each stream says again when done; tokens/s over an 8 s window)
# Order: DialoGPT-medium's decode, checks and concurrency first (the targets), then the other models.
# DRY=cpu runs the same steps with the tiny test architectures on the CPU (to try the script here).
set -u
OUT=${OUT:-/tmp/gpu-out}
RES=/tmp/gpu-results
WORK=${WORK:-/tmp/gpu-work}
mkdir -p "$OUT" "$RES"
source bench/device_env.sh   # the npctalk shim, PYTHONPATH, timed_step
if [ "${DRY:-}" = cpu ]; then
    DEVICE=cpu; MODELS="tiny-gpt2 tiny-llama"; LIMITS="120 120"; STREAMS="1 4"; EXTRA="--layout slots"; CONC="1 4"; SLOTCTX=500; STEADY="1 4"
else
    DEVICE=cuda; MODELS="dialogpt-medium smollm2-135m dialogpt-small dialogpt-large"; LIMITS="120 80 60 100"
    STREAMS="1 16 64"; EXTRA=""; CONC="1 8 32 64"; SLOTCTX=1024; STEADY="1 64"
fi

STREAMS=${STREAMS_OVERRIDE:-$STREAMS}
pack() { pack_results "$RES" "$OUT"; }
# step NAME SECONDS COMMAND...; with ONLY="name ..." set, the steps not named are skipped
step() {
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $1 "* ]]; then echo "== $1 skipped (not in ONLY)"; return 0; fi
    timed_step "$RES" "$OUT" "$@"
}

step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 - <<PY
import onnxruntime as ort, numpy, sys
print("python", sys.version.split()[0], "onnxruntime", ort.__version__, ort.get_available_providers(), "numpy", numpy.__version__)
import torch, transformers
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("transformers", transformers.__version__)
from npctalk.engine.slots import SlotDecoder
print("npctalk importable")
PY'

run_decode() {  # run_decode MODEL LIMIT
    step "decode-$1" "$2" python3 -m bench.decode --device "$DEVICE" --models "$1" --dtypes fp16 \
        --graphs lean --streams $STREAMS --peers hf --peers-first --repeats 1 --no-default --generic-too --work "$WORK" \
        --out "$RES" --tag "$1" $EXTRA --note "bench/gpu_session.sh on the device lent to the session"
}
set -- $MODELS
first=$1
set -- $LIMITS
first_limit=$1
# The first model's bundle, as decode-$first builds it (the decode step reuses it): the checks and the
# server runs need only this, so a short lease can run them without the decode step.
step export 90 python3 -c "
import logging, sys
from pathlib import Path
from bench.decode import build_hf_folder, export
logging.basicConfig(level=logging.INFO)
bundle, note = export(build_hf_folder('$first', Path('$WORK')), Path('$WORK'), 'fp16', 'lean', '$DEVICE', '${EXTRA:+slots}' or 'auto')
print(bundle, note)"
bundle=$(ls -d "$WORK"/bundles/"$first"-lean-fp16-* 2>/dev/null | head -n 1)
step checks 75 python3 -m bench.gpu_checks --bundle "${bundle:-missing}" --device "$DEVICE" --out "$RES"
rm -f "$RES"/profile*.json
# Each kernel's time in a decode step (Nsight Compute), 1 and 64 rows: kernels or the gaps between them?
step kernels-1 90 python3 -m bench.kernel_times --bundle "${bundle:-missing}" --streams 1 --out "$RES"
step kernels-64 90 python3 -m bench.kernel_times --bundle "${bundle:-missing}" --streams 64 --out "$RES"
step concurrency 90 python3 bench/concurrency.py --model "${bundle:-missing}" --provider "$DEVICE" \
    --streams $CONC --max-new-tokens 128 --slot-context $SLOTCTX --out "$RES" --server-log "$RES/concurrency-server.log"
step concurrency-alone 60 python3 bench/concurrency.py --model "${bundle:-missing}" --provider "$DEVICE" \
    --streams $CONC --max-new-tokens 128 --slot-context $SLOTCTX --out "$RES" --server-args=--group-cached-prompts=off --tag alone
step concurrency-together 60 python3 bench/concurrency.py --model "${bundle:-missing}" --provider "$DEVICE" \
    --streams $CONC --max-new-tokens 128 --slot-context $SLOTCTX --out "$RES" --server-args=--prefill-chunk=4096 --tag together4096
step concurrency-noprefix 60 python3 bench/concurrency.py --model "${bundle:-missing}" --provider "$DEVICE" \
    --streams $CONC --max-new-tokens 128 --slot-context $SLOTCTX --out "$RES" --server-args=--prefix-cache-mb=0 --tag noprefix
run_decode "$first" "$first_limit"
step concurrency-steady 60 python3 bench/concurrency.py --model "${bundle:-missing}" --provider "$DEVICE" \
    --streams $STEADY --max-new-tokens 128 --slot-context $SLOTCTX --out "$RES" --steady 8 --warmup 3 --tag steady
step concurrency-ahead 90 python3 bench/concurrency.py --model "${bundle:-missing}" --provider "$DEVICE" \
    --streams $CONC --max-new-tokens 128 --slot-context $SLOTCTX --out "$RES" --server-args=--decode-ahead --tag ahead
step concurrency-sampled 60 python3 bench/concurrency.py --model "${bundle:-missing}" --provider "$DEVICE" \
    --streams $CONC --max-new-tokens 128 --slot-context $SLOTCTX --out "$RES" --sampled --top-tokens 64 --tag top64
step concurrency-sampled-full 60 python3 bench/concurrency.py --model "${bundle:-missing}" --provider "$DEVICE" \
    --streams $CONC --max-new-tokens 128 --slot-context $SLOTCTX --out "$RES" --sampled --top-tokens 0 --tag full-rows

set -- $MODELS; shift; rest="$*"
set -- $LIMITS; shift
for model in $rest; do
    run_decode "$model" "$1"; shift
done
pack
cat "$RES"/decode-*.md "$RES"/concurrency-*.md 2>/dev/null
grep -h "placement\|memory\|parity" "$RES/checks.log" 2>/dev/null | cut -c1-600
ls -la "$OUT"
