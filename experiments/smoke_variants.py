"""The smoke run and two variants, side by side: mixed precision
(`--config.dtype=bfloat16`: bfloat16 compute, float32 parameters and
optimizer state) and XLA's convolution for the stages' forward-only work
(`--config.forward_impl=auto`: teacher features and evaluation, the frozen
students of head fine-tuning; training keeps im2col).

Runs (or resumes) `configs/fashion_mnist.py:smoke` with the same seed in
`<root>/<variant>`, or reads the results.json a finished run of the same
config left there (its stage seconds are those of that run), and writes
experiments/results/smoke_variants_<backend>.{md,json}. Targets (issue):
bfloat16 within 0.5 points of float32 on the TCN; the baseline's digests
those of the code before either option.

  python -m experiments.smoke_variants --root runs/smoke_variants
"""
import argparse
import json
import os

import jax

from experiments import bench_students as bs
from experiments import common
import tcn_jax
from tcn_jax import config as config_lib
from tcn_jax import workdir as workdir_lib

# variant name -> config overrides.
VARIANTS = {'float32': {}, 'bfloat16': {'dtype': 'bfloat16'},
            'forward_xla': {'forward_impl': 'auto'}}
TARGET_POINTS = 0.5
ACCURACIES = (('teacher', 'teacher_test_acc'),
              ('TCN before head fine-tuning', 'tcn_test_acc_before_finetune'),
              ('TCN', 'tcn_test_acc_after_finetune'))
STAGES = ('teacher', 'features', 'students', 'head')


def finished(workdir, config):
  """The results.json of a finished run of `config` in `workdir`, or None."""
  results = common.read_results(os.path.join(workdir, 'results.json'))
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      stored = json.load(f)
  except (OSError, ValueError):
    return None
  same = not workdir_lib.diff(stored, config_lib.to_json(
      config_lib.resolve(config)))
  return results if same else None


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--root', required=True)
  ap.add_argument('--preset', default='smoke')
  args = ap.parse_args()
  runs = {}
  for name, overrides in VARIANTS.items():
    config = common.get_config('fashion_mnist', args.preset)
    for field, value in overrides.items():
      config[field] = value
    workdir = os.path.join(args.root, name)
    bs.log(f'{name}: {workdir}')
    runs[name] = finished(workdir, config) or tcn_jax.run(config, workdir)
  names = list(VARIANTS)
  acc = {label: {n: 100 * runs[n][k] for n in names}
         for label, k in ACCURACIES}
  delta = acc['TCN']['bfloat16'] - acc['TCN']['float32']
  met = abs(delta) <= TARGET_POINTS
  meta = bs.meta_info(command=common.command(), root=args.root,
                      preset=args.preset, variants=VARIANTS,
                      loadavg_end=bs.loadavg())
  head = ' | '.join(f'`{n}`' for n in names)
  lines = [f'# The smoke run: float32, bfloat16 compute, XLA forward '
           f'convolution ({meta["backend"]}, `:{args.preset}`)', '',
           f'Command: `{meta["command"]}`', '',
           f'Device: {meta["device"]} ({meta["cpu_count"]} cores, shared; '
           f'load average {meta["loadavg_end"]} at the end); jax '
           f'{jax.__version__}. One config and seed; `bfloat16` = '
           '`--config.dtype=bfloat16` (teacher, students and KD students '
           'compute in bfloat16, parameters and optimizer state float32; '
           'head fine-tuning in float32); `forward_xla` = '
           '`--config.forward_impl=auto` (teacher features and evaluation '
           'and the frozen students of head fine-tuning on XLA\'s '
           'convolution; training on im2col).', '',
           f'| test accuracy (%) | {head} |', '|---|' + '---|' * len(names)]
  for label, r in acc.items():
    lines.append(f'| {label} | ' + ' | '.join(f'{r[n]:.2f}' for n in names)
                 + ' |')
  lines += ['', f'| wall seconds (shared machine) | {head} |',
            '|---|' + '---|' * len(names)]
  for stage in STAGES:
    lines.append(f'| {stage} | ' + ' | '.join(
        f'{runs[n]["wall_seconds_this_run"].get(stage, float("nan")):.1f}'
        for n in names) + ' |')
  lines += ['', '| digest | ' + head + ' |', '|---|' + '---|' * len(names)]
  for part in ('teacher', 'tcn'):
    lines.append(f'| {part} | ' + ' | '.join(
        f'`{runs[n]["digests"][part][:16]}…`' for n in names) + ' |')
  lines += ['', f'Mixed precision target: the TCN within {TARGET_POINTS} '
            f'points of float32: {"met" if met else "not met"} '
            f'({delta:+.2f} points; one seed, 1,000 test images: one image '
            'is 0.1 point). On the CPU bfloat16 is emulated, not faster.',
            '', 'Full digests in the JSON (`results.<variant>.digests`).']
  bs.write_results(
      os.path.join(bs.RESULTS, f'smoke_variants_{meta["backend"]}'),
      {'meta': meta, 'accuracy_percent': acc,
       'bfloat16_tcn_difference_points': delta,
       'bfloat16_target_met': met, 'results': runs}, lines)


if __name__ == '__main__':
  main()
