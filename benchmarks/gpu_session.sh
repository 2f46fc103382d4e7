#!/bin/bash
# One lent-GPU session in one call (the device tool's machine: torch + triton preinstalled, no network, no
# project install): kernel tests on CUDA, then the kernel benchmark cells the goals name.
#   device run: bash benchmarks/gpu_session.sh   (carry .whl holding the liger-kernel wheel, optional)
# Writes logs and JSON under $OUT (or ./gpu-out; the device tool returns at most 8 files: this writes 8); each stage has its own time limit so a slow stage cannot
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

echo "== kernel tests on CUDA (one pinned config per kernel: no autotuning of each test shape)"
# from a copy of tests/: run from the checkout, pytest puts its root on sys.path and the source tree's
# prmkd_dist (which has no kernels/ subpackage) would shadow the laid-out one
REPO=$PWD; rm -rf /tmp/tt && mkdir -p /tmp/tt && cp -r tests /tmp/tt/
(cd /tmp/tt && PRMKD_TRITON_AUTOTUNE=0 timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider tests/kernels) > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT/tests.log"; cd "$REPO"

# logits given: plain step time (with Python dispatch) and the kernels alone (CUDA graph replay)
echo "== logits given, tau 0.7 (two exp2 per logit)"
timeout ${LOGITS_S:-120} python3 benchmarks/kernels.py --forms logits --batch 1024 4096 --items 1e5 1e6 \
  --backends triton triton-inplace --warmup 2 --reps 10 --temperature 0.7 \
  --out "$OUT/logits_tau07.json" > "$OUT/logits_tau07.log" 2>&1
echo "rc=$?"
echo "== logits given, tau 1 (one exp2 per logit), against eager, torch.compile and Liger CE"
timeout ${LOGITS1_S:-200} python3 benchmarks/kernels.py --forms logits --batch 1024 4096 --items 1e5 1e6 \
  --backends triton triton-inplace reference compile liger --warmup 2 --reps 10 --temperature 1.0 \
  --out "$OUT/logits_tau1.json" > "$OUT/logits_tau1.log" 2>&1
echo "rc=$?"
echo "== fused linear, tau 1"
timeout ${LINEAR_S:-80} python3 benchmarks/kernels.py --forms linear --batch 1024 --items 1e6 --linear-items 1e7 \
  --dim 64 --backends triton --warmup 2 --reps 5 --temperature 1.0 \
  --out "$OUT/linear_tau1.json" > "$OUT/linear_tau1.log" 2>&1
echo "rc=$?"
grep -h '^|\|^device\|^measured' "$OUT"/*.log
