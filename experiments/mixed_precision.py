"""Mixed precision on the smoke subset: the same run in float32 and with
bfloat16 compute (`--config.dtype=bfloat16`; parameters and optimizer state
float32), test accuracies side by side.

Runs (or resumes, or reuses finished) `configs/fashion_mnist.py:smoke` in
`<root>/float32` and `<root>/bfloat16` with the same seed, and writes
experiments/results/mixed_precision_<backend>.{md,json}. Target (issue):
the TCN's accuracy within 0.5 points of float32.

  python -m experiments.mixed_precision --root runs/mixed_precision
"""
import argparse
import os

import jax

from experiments import bench_students as bs
from experiments import common
import tcn_jax

DTYPES = ('float32', 'bfloat16')
TARGET_POINTS = 0.5


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--root', required=True)
  ap.add_argument('--preset', default='smoke')
  args = ap.parse_args()
  runs = {}
  for dtype in DTYPES:
    config = common.get_config('fashion_mnist', args.preset)
    config.dtype = dtype
    bs.log(f'{dtype}: {os.path.join(args.root, dtype)}')
    runs[dtype] = tcn_jax.run(config, os.path.join(args.root, dtype))
  keys = (('teacher', 'teacher_test_acc'),
          ('TCN before head fine-tuning', 'tcn_test_acc_before_finetune'),
          ('TCN', 'tcn_test_acc_after_finetune'))
  rows = {name: {d: 100 * runs[d][k] for d in DTYPES} for name, k in keys}
  seconds = {d: runs[d]['train_seconds'] for d in DTYPES}
  delta = rows['TCN']['bfloat16'] - rows['TCN']['float32']
  met = abs(delta) <= TARGET_POINTS
  meta = bs.meta_info(command=common.command(), root=args.root,
                      preset=args.preset, loadavg_end=bs.loadavg())
  lines = [f'# Mixed precision: float32 vs bfloat16 compute '
           f'({meta["backend"]}, `:{args.preset}`)', '',
           f'Command: `{meta["command"]}`', '',
           f'Device: {meta["device"]} ({meta["cpu_count"]} cores, shared; '
           f'load average {meta["loadavg_end"]} at the end); jax '
           f'{jax.__version__}. The same config and seed; `dtype=bfloat16` '
           'computes the teacher, the students and the KD students in '
           'bfloat16 with float32 parameters and optimizer state (head '
           'fine-tuning, predict and export in float32).', '',
           '| test accuracy (%) | float32 | bfloat16 | difference |',
           '|---|---|---|---|']
  for name, r in rows.items():
    lines.append(f'| {name} | {r["float32"]:.2f} | {r["bfloat16"]:.2f} | '
                 f'{r["bfloat16"] - r["float32"]:+.2f} |')
  lines += ['', '| training seconds | float32 | bfloat16 |', '|---|---|---|']
  for stage in ('teacher', 'students', 'head'):
    lines.append(f'| {stage} | {seconds["float32"][stage]:.1f} | '
                 f'{seconds["bfloat16"][stage]:.1f} |')
  lines += ['', f'Target: the TCN within {TARGET_POINTS} points of float32: '
            f'{"met" if met else "not met"} ({delta:+.2f} points). On the '
            'CPU, bfloat16 is emulated and not faster; the seconds are '
            'those of a shared machine.',
            '', f'Digests: float32 TCN {runs["float32"]["digests"]["tcn"]}, '
            f'teacher {runs["float32"]["digests"]["teacher"]}.']
  bs.write_results(
      os.path.join(bs.RESULTS, f'mixed_precision_{meta["backend"]}'),
      {'meta': meta, 'accuracy_percent': rows, 'train_seconds': seconds,
       'tcn_difference_points': delta, 'target_met': met,
       'results': runs}, lines)


if __name__ == '__main__':
  main()
