"""Benchmark: what online features and on-device views cost per student
epoch, against cached features, side by side in one process.

The `:consistent` Fashion-MNIST students (n = 2, PCA-balanced chunks,
batch 128; the md names their architecture) train on `--rows` real
training images from the features of a trained teacher (`--teacher`, a
workdir of this library, e.g. README command 1's), three ways:

  cached   the teacher's features computed once (the paper);
  online   the frozen teacher's forward pass inside every step;
  views    online, on a random view of each batch drawn on device
           (config.students.views='pad_crop_flip_mixup', preset
           'consistent').

Each variant trains 2 epochs; the second (no compilation) is timed. Rounds
interleave the variants (A, B, C, A, B, C, ...) and the medians of the
per-round ratios are reported, with the load average, so ratios stay fair
on a shared machine. The students' loss is plain MSE in all three (the
`:best` recipe's logit matching adds the same head pass to each).

  python -m experiments.bench_views --teacher runs/fmnist [--rows 6400] [--rounds 3]

Writes experiments/results/bench_views_<backend>.{md,json}.
"""
import argparse
import json
import os
import statistics

import jax

from experiments import common
from tcn_jax import chunking
from tcn_jax import config as config_lib
from tcn_jax import data as data_lib
from tcn_jax import features
from tcn_jax import models
from tcn_jax import students
from tcn_jax import teacher as teacher_lib

VARIANTS = ('cached', 'online', 'views')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher', required=True,
                      help='a workdir of a `:best` run (its teacher/)')
  parser.add_argument('--rows', type=int, default=6400)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  c = config_lib.resolve(common.get_config('fashion_mnist', 'consistent'))
  ds = data_lib.load(c.data)
  x = ds.train.x[:args.rows]
  t = c.teacher
  teacher = models.Teacher(t.body, ds.num_classes, t.head_dropout,
                           c.layers_impl, t.head_bn)
  variables = teacher_lib.load_teacher(args.teacher, teacher, x[:1])
  f_train = features.teacher_features(teacher, variables, x)
  f_val = features.teacher_features(teacher, variables, ds.val.x)
  chunker = chunking.fit(c.chunking, f_train, c.num_students,
                         c.pca_assignment)
  spec = config_lib.student_specs(c)[0]
  s = c.students
  common_args = dict(
      epochs=2, batch_size=s.batch_size,
      optimizer=students.Optimizer(s.optimizer, s.learning_rate,
                                   s.lr_schedule),
      nets=students.Nets(s.out_relu, s.init, c.layers_impl),
      val=(ds.val.x[:1000], chunker.encode(f_val[:1000])), seed=c.seed)
  online = {'teacher': teacher, 'variables': variables, 'chunker': chunker}
  runs = {
      'cached': lambda: students.train_students(
          spec, x, chunker.encode(f_train), c.num_students, **common_args),
      'online': lambda: students.train_students(
          spec, x, None, c.num_students, **common_args,
          objective=students.Objective(online=online)),
      'views': lambda: students.train_students(
          spec, x, None, c.num_students, **common_args,
          objective=students.Objective(online=dict(online, views=s.views))),
  }
  times = {v: [] for v in VARIANTS}
  loads = []
  for r in range(args.rounds):
    for v in VARIANTS:
      load = os.getloadavg()[0]
      _, info = runs[v]()
      h = info['history'][0]
      times[v].append(h[1]['seconds'] - h[0]['seconds'])
      loads.append((v, r, load, os.getloadavg()[0]))
      print(f'round {r} {v}: {times[v][-1]:.2f} s/epoch of '
            f'{len(x) // s.batch_size} steps', flush=True)
  steps = len(x) // s.batch_size
  full_steps = len(ds.train.x) // s.batch_size
  result = {
      'command': common.command(), 'machine': common.machine(),
      'backend': jax.default_backend(), 'rows': len(x), 'steps': steps,
      'student_spec': spec, 'num_students': c.num_students,
      'views': s.views, 'seconds_per_epoch': times,
      'median_seconds_per_step': {v: statistics.median(t) / steps
                                  for v, t in times.items()},
      'ratio_to_cached': {v: statistics.median(
          [a / b for a, b in zip(times[v], times['cached'])])
                          for v in VARIANTS},
      'load_average_before_after': loads,
      'full_epoch_steps': full_steps,
  }
  out = os.path.join(common.RESULTS, f'bench_views_{jax.default_backend()}')
  with open(out + '.json', 'w') as f:
    json.dump(result, f, indent=1)
  m = result['machine']
  lines = [
      '# What online features and on-device views cost per student epoch',
      '',
      f'Command: `{result["command"]}`  ',
      f'Machine: {m.get("cpu")}, {m.get("cores")} cores, AVX-512: '
      f'{m.get("avx512")}; backend {result["backend"]}.',
      '',
      f'`:consistent` students (n = {c.num_students}, `{spec}`), batch '
      f'{s.batch_size}, {steps} steps per timed epoch (the second of two), '
      f'{args.rounds} interleaved rounds; ratios are medians of per-round '
      'ratios.', '',
      '| variant | s / step (median) | s / full epoch (x'
      f' {full_steps} steps) | vs cached |',
      '|---|---|---|---|']
  for v in VARIANTS:
    per = result['median_seconds_per_step'][v]
    lines.append(f'| {v} | {per:.4f} | {per * full_steps:.1f} | '
                 f'{result["ratio_to_cached"][v]:.2f}x |')
  lines += ['', 'Load average (1 min) before / after each measurement: '
            + ', '.join(f'{v}{r}: {a:.1f}/{b:.1f}' for v, r, a, b in loads),
            '']
  with open(out + '.md', 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
