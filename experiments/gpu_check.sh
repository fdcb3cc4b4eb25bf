#!/usr/bin/env bash
# Accelerator checks, in one go: the layer and engine equivalence tests on the
# device, the student-training benchmark, float32 vs bfloat16 with n = 8
# students in one program vs one after another (nominal H200 dense peaks:
# 67 TFLOP/s float32, 989 bfloat16), and the default Fashion-MNIST job.
#   OUT=/tmp/gpu DATA=/usr/share/datasets/fashion-mnist bash experiments/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; DATA=${DATA:-/usr/share/datasets/fashion-mnist}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -c "import jax; print(jax.__version__, jax.devices())"
python3 -m pytest tests/test_layers.py tests/test_engine.py -q -p no:cacheprovider 2>&1 | tail -15
python3 -m experiments.bench_students --steps 50 --repeats 3
python3 -m experiments.bench_precision --steps 200 --repeats 3 --n 8 --peak-tflops 67,989
python3 -m tcn_jax.main --config configs/fashion_mnist.py --workdir "$OUT/run" \
  --config.data.dir="$DATA" 2>&1 | grep -v orbax | grep -E "epoch|accuracy|error|Error" | tail -60
cp "$OUT/run/results.json" "$OUT/results_gpu.json"
cp experiments/results/bench_students_gpu.* experiments/results/bench_precision_gpu.* "$OUT/" 2>/dev/null
