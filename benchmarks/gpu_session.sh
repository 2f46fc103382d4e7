#!/bin/bash
# One lent-GPU session in one call (the device tool's machine: torch + triton preinstalled, no network, no
# project install): kernel tests on CUDA, then kernel cells (T = 3, K = 50, bf16, tau 1) against eager and
# torch.compile: the whole grid with GRID=full (B in {256, 1024, 4096}, C in {1e4, 1e5, 1e6} (+ 1e7 fused
# linear), d in {64, 128}), else (default) the cells still open after it (see GRID below).
#   device run: bash benchmarks/gpu_session.sh   (carry .whl holding the liger-kernel wheel to add Liger cells)
# Measured 2026-11-27 on an H200: the kernel tests take ~100 s (more since the column-split cases: 73 of ~80 in
# 140 s; give TEST_S 180) and the whole grid does not fit one 10-minute call (the
# logits stage reached 7 of its 9 shapes in 230 s, torch.compile compiling each shape; the fused-linear stage 25 of
# 36 cells in 150 s): raise LOGITS_S / LINEAR_S, or narrow the grid, to the session's device time.
# GRID=splits: kernel tests, then the column-split A/B of the logits form (see below).
# Writes logs and JSON under $OUT (or ./gpu-out; the device tool returns at most 8 files: this writes 8). Each
# stage has its own time limit so a slow stage cannot take the others' results with it, and the benchmark saves
# its JSON after every cell; the largest cells come first, so a stage cut short loses the smallest ones.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  LIGER=liger
else
  LIGER=
fi
# the package as the wheel lays it out (kernels/ -> prmkd_dist.kernels); the CPU extension is not built here
rm -rf /tmp/pk && mkdir -p /tmp/pk && cp -r prmkd_dist /tmp/pk/ && cp -r kernels /tmp/pk/prmkd_dist/kernels
rm -f /tmp/pk/prmkd_dist/_C*.so
export PYTHONPATH=/tmp/pk:/tmp/site
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# (from /tmp: run in the checkout, the source tree's prmkd_dist, which has no kernels/, would shadow the copy)
(cd /tmp && python3 -c "import torch, triton, prmkd_dist.kernels.kd_loss; print('torch', torch.__version__, 'triton', triton.__version__)") \
  > "$OUT/import.txt" 2>&1 || { cat "$OUT/import.txt"; exit 1; }
cat "$OUT/import.txt" >> "$OUT/gpu.txt"; rm "$OUT/import.txt"

echo "== kernel tests on CUDA (one pinned config per kernel: no autotuning of each test shape)"
# from a copy of tests/: run from the checkout, pytest puts its root on sys.path and the source tree's
# prmkd_dist (which has no kernels/ subpackage) would shadow the laid-out one
REPO=$PWD; rm -rf /tmp/tt && mkdir -p /tmp/tt && cp -r tests benchmarks /tmp/tt/  # (test_host_ops loads a benchmark)
(cd /tmp/tt && PRMKD_TRITON_AUTOTUNE=0 timeout ${TEST_S:-180} python3 -m pytest -q -p no:cacheprovider tests/kernels) > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT/tests.log"; cd "$REPO"

if [ "${GRID:-small}" = splits ]; then
  # A/B of the logits form's column splits (kernels/kd_loss.py column_splits) against one program per row,
  # in one call on one machine: where B is small and C wide (B = 256: ~2 programs per SM)
  for S in auto 1; do
    echo "== logits given, column splits $S: B {256 1024} x C {1e6 1e5}, Triton (fresh and in-place gradient)"
    if [ $S = auto ]; then unset PRMKD_TRITON_COLUMN_SPLITS; else export PRMKD_TRITON_COLUMN_SPLITS=$S; fi
    timeout ${SPLITS_S:-110} python3 benchmarks/kernels.py --forms logits --batch 256 1024 --items 1e6 1e5 \
      --backends triton triton-inplace --warmup 2 --reps 10 --temperature 1.0 \
      --out "$OUT/splits-$S.json" > "$OUT/splits-$S.log" 2>&1
    echo "rc=$?"
  done
  unset PRMKD_TRITON_COLUMN_SPLITS
  grep -h '^|\|^device\|^measured' "$OUT"/splits-*.log
  exit 0
fi

# GRID=full: the whole grid (measured 2026-11-27: does not fit one 10-minute call with the tests);
# GRID=small (default): the cells still open after it, where the step is bound by the host: B x C <= 1e8, every
# backend also replayed from a CUDA graph (the benchmark's "graph replay"), and the fused-linear step after its
# host ops were cut (72 -> 46 aten ops, benchmarks/host_ops.py; predicted ~0.7 ms faster per step, RESULTS.md)
if [ "${GRID:-small}" = full ]; then
  LB="4096 1024 256"; LC="1e6 1e5 1e4"; NB="1024 4096 256"; NC="1e6 1e5 1e4"; NX="1e7"
else
  LB="4096 1024 256"; LC="1e5 1e4"; NB="1024 4096 256"; NC="1e5 1e4"; NX=""
fi
echo "== logits given: B {$LB} x C {$LC}, Triton (fresh and in-place gradient) vs eager and torch.compile"
timeout ${LOGITS_S:-230} python3 benchmarks/kernels.py --forms logits --batch $LB --items $LC \
  --backends triton triton-inplace reference compile $LIGER --warmup 2 --reps 10 --temperature 1.0 \
  --out "$OUT/logits.json" > "$OUT/logits.log" 2>&1
echo "rc=$?"
echo "== fused linear: B {$NB} x C {$NC $NX} x d {64, 128}, Triton vs eager (eager skipped where it cannot fit)"
timeout ${LINEAR_S:-150} python3 benchmarks/kernels.py --forms linear --batch $NB --items $NC \
  --linear-items $NX --dim 64 128 --backends triton reference --warmup 2 --reps 5 --temperature 1.0 \
  --out "$OUT/linear.json" > "$OUT/linear.log" 2>&1
echo "rc=$?"
echo "== fused linear vs torch.compile (compilation per shape: a few cells)"
timeout ${LINEAR_COMPILE_S:-70} python3 benchmarks/kernels.py --forms linear --batch 1024 4096 --items 1e5 \
  --linear-items --dim 64 128 --backends compile --warmup 2 --reps 5 --temperature 1.0 \
  --out "$OUT/linear_compile.json" > "$OUT/linear_compile.log" 2>&1
echo "rc=$?"
grep -h '^|\|^device\|^measured' "$OUT"/*.log
