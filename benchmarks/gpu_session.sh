#!/bin/bash
# One lent-GPU session in one call (the device tool's machine: torch + triton preinstalled, no network, no
# project install): kernel tests on CUDA, then the kernel benchmark cells the goals name.
#   device run: bash benchmarks/gpu_session.sh   (carry .whl holding the liger-kernel wheel, optional)
# Writes logs and JSON under $OUT (or ./gpu-out; the device tool returns at most 8 files); each stage has its own time limit so a slow stage cannot
# take the others' results with it.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
# the package as the wheel lays it out (kernels/ -> prmkd_dist.kernels); the CPU extension is not built here
rm -rf /tmp/pk && mkdir -p /tmp/pk && cp -r prmkd_dist /tmp/pk/ && cp -r kernels /tmp/pk/prmkd_dist/kernels
rm -f /tmp/pk/prmkd_dist/_C*.so
export PYTHONPATH=/tmp/pk:/tmp/site
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

echo "== kernel tests on CUDA"
# from a copy of tests/: run from the checkout, pytest puts its root on sys.path and the source tree's
# prmkd_dist (which has no kernels/ subpackage) would shadow the laid-out one
REPO=$PWD; rm -rf /tmp/tt && mkdir -p /tmp/tt && cp -r tests /tmp/tt/
(cd /tmp/tt && timeout ${TEST_S:-120} python3 -m pytest -q -p no:cacheprovider tests/kernels) > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -5 "$OUT/tests.log"; cd "$REPO"

echo "== logits given"
timeout ${LOGITS_S:-200} python3 benchmarks/kernels.py --forms logits --batch 1024 4096 --items 1e5 1e6 \
  --backends reference compile triton triton-inplace liger --warmup 2 --reps 10 \
  --out "$OUT/kernels_logits.json" > "$OUT/logits.md" 2> "$OUT/logits.log"
echo "logits rc=$?"
echo "== fused linear"
timeout ${LINEAR_S:-110} python3 benchmarks/kernels.py --forms linear --batch 1024 --items 1e5 1e6 \
  --linear-items 1e7 --dim 64 128 --backends reference triton liger --warmup 2 --reps 5 \
  --out "$OUT/kernels_linear.json" > "$OUT/linear.md" 2> "$OUT/linear.log"
echo "linear rc=$?"
timeout ${COMPILE_S:-60} python3 benchmarks/kernels.py --forms linear --batch 1024 --items 1e6 --linear-items \
  --dim 64 --backends compile --warmup 2 --reps 5 \
  --out "$OUT/kernels_linear_compile.json" > "$OUT/linear_compile.md" 2> "$OUT/linear_compile.log"
echo "linear compile rc=$?"
cat "$OUT/logits.md" "$OUT/linear.md" "$OUT/linear_compile.md" 2>/dev/null | grep -v '^$'
