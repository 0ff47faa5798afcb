#!/usr/bin/env bash
# Sourced by the device scripts (gpu_session.sh, finetune_gpu.sh) on the lent GPU machine: npctalk
# imported from this checkout through a symlink shim (nothing is pip-installed there), onnxruntime-gpu
# and the export stack from /tmp/site (../shared/device's runs), and the CUDA libraries PyTorch ships
# loaded before onnxruntime needs them.
SHIM=/tmp/npctalk-shim
mkdir -p "$SHIM/npctalk"
for pair in engine:engine export:export client:bindings/python finetune:finetune demo:demo_game; do
    ln -sfn "$PWD/${pair#*:}" "$SHIM/npctalk/${pair%%:*}"
done
# onnxruntime-gpu finds the CUDA/cuDNN libraries PyTorch ships only after preload_dlls().
cat > "$SHIM/sitecustomize.py" <<'PY'
try:
    import onnxruntime
    if hasattr(onnxruntime, "preload_dlls") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        onnxruntime.preload_dlls()
except Exception as exc:  # reported by the env step
    print("sitecustomize: preload_dlls failed:", exc)
PY
export PYTHONPATH=/tmp/site:$SHIM:$PWD PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error

# pack_results DIR OUT: DIR's files into OUT/gpu-results.tgz (after every step, so a run cut short keeps them)
# Written aside and renamed: steps that run side by side (finetune_gpu.sh) never leave a torn archive.
pack_results() { tar czf "$2/.gpu-results.tgz.$BASHPID" -C "$1" . 2>/dev/null; mv -f "$2/.gpu-results.tgz.$BASHPID" "$2/gpu-results.tgz"; }

# timed_step DIR OUT NAME SECONDS COMMAND...: time-limited, logged to DIR/NAME.log, packed after; never stops the script
timed_step() {
    local res=$1 out=$2 name=$3 limit=$4; shift 4
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout -k 5 "$limit" "$@" > "$res/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start))s: $(grep -v '^\s*$' "$res/$name.log" | tail -n 1 | cut -c1-200)"
    pack_results "$res" "$out"
    return 0
}
