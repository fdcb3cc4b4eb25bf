#!/usr/bin/env bash
# The Fashion-MNIST grid on one accelerator, within a time limit, resumable:
# JOBS runs in flight (python -m experiments.reproduce_fmnist --jobs), stopped
# cleanly (SIGTERM: every run saves its epoch) after LIMIT seconds; rerun the
# same command on the same machine to go on. Copies each finished run's
# results.json and config.json to $OUT/gpu_grid/seed<S>/<run>/ and the
# report to $OUT/gpu_grid/report.{md,json}, for experiments.tables, and
# all of it (with each run's log.txt) to $OUT/gpu_grid.tar.gz.
# SMOKE=1: the ':smoke' subset (a check of this script, minutes on a CPU).
#   OUT=/tmp/gpu LIMIT=540 JOBS=8 ONLY='ff*,gan*' \
#     DATA=/usr/share/datasets/fashion-mnist bash experiments/gpu_grid.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_grid}; DATA=${DATA:-/usr/share/datasets/fashion-mnist}
[ -d "$DATA" ] || DATA=$PWD/.data/fashion-mnist   # Carried with the tree.
LIMIT=${LIMIT:-540}; JOBS=${JOBS:-8}; ONLY=${ONLY:-}; SEEDS=${SEEDS:-0 1}
ROOT=${ROOT:-runs/gpu_grid}
export PYTHONUNBUFFERED=1
# Wheels the device image may lack (carried in .whl/ when it has no index).
if ! python3 -c 'import ml_collections, tensorboardX' 2>/dev/null; then
  python3 -m pip install -q --no-deps .whl/*.whl 2>/dev/null ||
    python3 -m pip install -q ml_collections tensorboardX
fi
python3 -m pip install -q --no-deps -e . >/dev/null 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())"
timeout -s TERM -k 60 "$LIMIT" python3 -m experiments.reproduce_fmnist \
  --seeds $SEEDS --jobs "$JOBS" --root "$ROOT" ${ONLY:+--only "$ONLY"} \
  ${SMOKE:+--smoke} \
  --out "$OUT/gpu_grid/report" \
  --device-extra-flags "--config.data.dir=$DATA" 2>&1 | grep -v orbax | tail -80
for f in "$ROOT"/seed*/*/results.json; do
  [ -e "$f" ] || continue
  d=$(dirname "$f"); dst="$OUT/gpu_grid/${d#"$ROOT"/}"
  mkdir -p "$dst" && cp "$f" "$d/config.json" "$d/log.txt" "$dst/"
done
ls "$OUT/gpu_grid"/seed* 2>/dev/null | head -100
# A device returns only a few files from shallow folders: one archive as well.
tar -czf "$OUT/gpu_grid.tar.gz" -C "$OUT" gpu_grid && ls -la "$OUT/gpu_grid.tar.gz"
