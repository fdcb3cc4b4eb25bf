#!/usr/bin/env bash
# Every speed benchmark of experiments/README.md "Benchmarks (CPU)", one command:
#   pip install -e '.[bench]' && bash experiments/run_benchmarks.sh
# Writes experiments/results/{bench_keras,bench_students,bench_inference,
# bench_distributed}_cpu.{md,json}. About 25 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m experiments.bench_keras --teacher-steps 20 --student-steps 40 --repeats 3
python -m experiments.bench_students --steps 6 --repeats 4 --host-devices 2
python -m experiments.bench_inference
python -m experiments.bench_distributed --steps 5 --repeats 3 --devices 2,4 --batches 1,128,1000 --calls 30
