#!/usr/bin/env bash
# Fashion-MNIST runs on an accelerator: FF for n = 1, 2, 4, 8 and GAN n = 4
# with both MSE targets, sharing one teacher: ff4 trains it, the other runs
# load it (--config.teacher.init_from=<ff4's workdir>) instead of training.
#   OUT=/tmp/gpu DATA=/usr/share/datasets/fashion-mnist bash experiments/gpu_runs.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_runs}; DATA=${DATA:-/usr/share/datasets/fashion-mnist}
W=${W:-/tmp/gpu_runs_work}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$W"
run() {  # name, overrides...
  local name=$1; shift
  local init=()
  if [ "$name" != ff4 ]; then init=(--config.teacher.init_from="$W/ff4"); fi
  python3 -m tcn_jax.main --workdir "$W/$name" "$@" ${init[@]+"${init[@]}"} --config.data.dir="$DATA" \
    2>&1 | grep -E "\] epoch [0-9]+/[0-9]+ |accuracy|error" | tail -4
  cp "$W/$name/results.json" "$OUT/$name.json"
}
F=configs/fashion_mnist.py
run ff4 --config $F
run gan4_student_output --config $F:gan --config.gan.mse_target=student_output
run gan4_disc_reconstruction --config $F:gan --config.gan.mse_target=disc_reconstruction
for n in 1 2 8; do run ff$n --config $F --config.num_students=$n; done
