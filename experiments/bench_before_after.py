"""Speed of two source trees side by side on this machine (before / after a
refactor): per-step milliseconds of the students (the paper's n = 4 on
Fashion-MNIST, batch 128) in memory and streamed (the same arrays read
through Grain), and of the teacher, each tree's code run in its own
process, rounds interleaved (A, B, A, B, ...) so both see the same load.

  python -m experiments.bench_before_after --trees /path/to/old . \
      --names before after --rounds 3

Writes experiments/results/before_after_<backend>.{md,json}.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

from experiments import bench_students as bs
from experiments import common

# Runs inside a tree (cwd): prints one JSON line of step milliseconds.
_WORKER = r'''
import json, sys, time
import numpy as np
from tcn_jax import data as data_lib, input_pipeline as ip, models
from tcn_jax import students, teacher as teacher_lib
size = int(sys.argv[1])
split = data_lib.load_idx('/usr/share/datasets/fashion-mnist', 'train')
x = split.x[:size].astype(np.float32) / 255.0
y = split.y[:size].astype(np.int32)
feats = np.random.default_rng(0).random((size, 256), np.float32)
arch = 'C32 C32 MP C16 C16 MP Do.25 F D16r Do.3'
steps = size // 128
out = {}
for name, inputs in (('students_memory', x),
                     ('students_stream', ip.Stream(ip.ArraySource(x, y)))):
  _, info = students.train_students(arch, inputs, feats, 4, epochs=2,
                                    batch_size=128, val=(x[:10], feats[:10]))
  h = info['history'][0]   # Epoch 2 alone: no compilation in it.
  out[name] = 1000 * (h[1]['seconds'] - h[0]['seconds']) / steps
ds = data_lib.Dataset(data_lib.Split(x, y), data_lib.Split(x[:256], y[:256]),
                      data_lib.Split(x[:256], y[:256]), 10, 'bench')
t = models.Teacher('C32 C64 MP Do.25 F D256r D256r', 10)
_, info = teacher_lib.train_teacher(t, ds, epochs=2, batch_size=256)
h = info['history']
out['teacher'] = 1000 * (h[1]['seconds'] - h[0]['seconds']) / (size // 256)
print('RESULT ' + json.dumps(out))
'''


def run_tree(tree, size):
  proc = subprocess.run([sys.executable, '-c', _WORKER, str(size)], cwd=tree,
                        capture_output=True, text=True, check=False,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    raise SystemExit(f'{tree}: exit {proc.returncode}\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--trees', nargs=2, required=True)
  ap.add_argument('--names', nargs=2, default=('before', 'after'))
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--size', type=int, default=12800)
  ap.add_argument('--out', default=os.path.join(bs.RESULTS, 'before_after'))
  args = ap.parse_args()
  rounds = {n: [] for n in args.names}
  loads = []
  for r in range(args.rounds):
    for name, tree in zip(args.names, args.trees):
      before = bs.loadavg()
      rounds[name].append(run_tree(os.path.abspath(tree), args.size))
      loads.append({'round': r, 'tree': name, 'before': before,
                    'after': bs.loadavg()})
      bs.log(f'round {r} {name}: {rounds[name][-1]}')
  a, b = args.names
  metrics = list(rounds[a][0])
  median = {n: {m: float(np.median([x[m] for x in rounds[n]]))
                for m in metrics} for n in args.names}
  ratio = {m: float(np.median([y[m] / x[m] for x, y in zip(rounds[a],
                                                            rounds[b])]))
           for m in metrics}
  stream = {n: float(np.median([x['students_stream'] / x['students_memory']
                                for x in rounds[n]])) for n in args.names}
  meta = bs.meta_info(command=common.command(), trees=args.trees,
                      size=args.size, loadavg=loads)
  result = {'meta': meta, 'rounds': rounds, 'median_ms': median,
            f'{b}_over_{a}': ratio, 'stream_over_memory': stream}
  lines = [f'# Step time, {a} vs {b}, side by side ({meta["backend"]})', '',
           f'Command: `{meta["command"]}`', '',
           f'Device: {meta["device"]} ({meta["cpu_count"]} cores, shared); '
           f'{args.rounds} interleaved rounds, medians; ms per training '
           f'step of the second epoch (compilation excluded), '
           f'{args.size} Fashion-MNIST images, batch 128 (students, the '
           'paper\'s n = 4) and 256 (teacher).', '',
           f'| | {a} | {b} | {b} / {a} |', '|---|---|---|---|']
  for m in metrics:
    lines.append(f'| {m} | {median[a][m]:.1f} | {median[b][m]:.1f} | '
                 f'{ratio[m]:.3f} |')
  lines += ['', f'Streamed / in-memory step: {a} {stream[a]:.3f}, '
            f'{b} {stream[b]:.3f}.', '',
            'Load averages (1 min) before/after each run: ' + ', '.join(
                f'{x["tree"]} {x["before"][0]:.1f}/{x["after"][0]:.1f}'
                for x in loads) + '.']
  suffix = meta['backend']
  with open(f'{args.out}_{suffix}.json', 'w') as f:
    json.dump(result, f, indent=1)
  with open(f'{args.out}_{suffix}.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
