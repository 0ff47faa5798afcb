#!/usr/bin/env bash
# On the GPU machine, in each bring-up run after .device/install.sh: keep the pieces this run carried
# (bench/finetune_stage.sh) in /tmp/carried, which outlives the run while the machine stays warm.
mkdir -p /tmp/carried
cp -f .device/smollm2/smollm2.* /tmp/carried/ 2>/dev/null || true
echo "carried so far: $(ls /tmp/carried 2>/dev/null | tr '\n' ' ')"
