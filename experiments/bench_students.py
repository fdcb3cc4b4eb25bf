"""Benchmark: n students trained in one program vs one after another.

For the Fashion-MNIST paper students (n = 1, 2, 4, 8, batch 128), times
`steps` training steps of every strategy (one compiled program for all n
students) and of the same code training the students one after another
(n programs of one student each), all in this one process, and writes
experiments/results/bench_students_<backend>.{md,json}.

  python experiments/bench_students.py [--steps 20] [--ns 1,2,4,8]
"""
import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tcn_jax import engine  # pylint: disable=g-import-not-at-top
from tcn_jax import features
from tcn_jax import layers
from tcn_jax import models
from tcn_jax import train

SPEC = 'C32 C32 MP C16 C16 MP Do.25 F D16r Do.3'
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def time_epoch(ids, width, strategy, x, targets, steps, batch, repeats):
  """Median seconds for `steps` steps of a group, compile excluded."""
  model = models.student(SPEC, width)
  params = engine.init_group(lambda k: model.init(k, x[:1])['params'], 0, ids)
  tx = optax.adam(1e-3, eps=1e-7)
  opt_state = jax.vmap(tx.init)(params)

  def loss_fn(p, xb, tb, key):
    pred = model.apply({'params': p}, xb, train=True, rngs={'dropout': key})
    return train.mse_loss(pred, tb)

  epoch_fn = engine.make_epoch_fn(loss_fn, tx, len(ids), strategy)
  keys = engine.member_keys(0, ids)
  order = engine.batch_order(0, 0, steps * batch, batch)
  params, opt_state, l = epoch_fn(params, opt_state, x, targets, order, keys, 0)
  l.block_until_ready()
  times = []
  for r in range(repeats):
    t = time.perf_counter()
    params, opt_state, l = epoch_fn(params, opt_state, x, targets, order, keys,
                                    r + 1)
    l.block_until_ready()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--steps', type=int, default=20)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--ns', default='1,2,4,8')
  args = ap.parse_args()
  batch, backend = 128, jax.default_backend()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((args.steps * batch, 28, 28, 1), np.float32))
  rows = []
  for n in [int(v) for v in args.ns.split(',')]:
    width = features.chunk_sizes(256, n)[0]
    targets = jnp.asarray(rng.standard_normal((n, len(x), width), np.float32))
    row = {'n': n}
    for strategy in ('vmap', 'unrolled'):
      row[strategy] = time_epoch(list(range(n)), width, strategy, x, targets,
                                 args.steps, batch, args.repeats)
    # One after another: the same program for a single student, n times.
    row['sequential'] = n * time_epoch([0], width, 'unrolled', x, targets[:1],
                                       args.steps, batch, args.repeats)
    row['auto'] = engine.resolve_strategy('auto')
    best = min(('vmap', 'unrolled'), key=lambda s: row[s])
    row['speedup_best_vs_sequential'] = row['sequential'] / row[best]
    row['speedup_auto_vs_sequential'] = row['sequential'] / row[row['auto']]
    print(json.dumps(row), flush=True)
    rows.append(row)

  meta = {'backend': backend, 'device': str(jax.devices()[0]),
          'platform': platform.platform(), 'jax': jax.__version__,
          'layers_impl': layers.resolve_impl('auto'), 'steps': args.steps,
          'batch': batch, 'student': SPEC}
  os.makedirs(RESULTS, exist_ok=True)
  stem = os.path.join(RESULTS, f'bench_students_{backend}')
  with open(stem + '.json', 'w') as f:
    json.dump({'meta': meta, 'rows': rows}, f, indent=2)
  cmd = 'python experiments/bench_students.py ' + ' '.join(sys.argv[1:])
  lines = [f'# Student training: one program vs one after another ({backend})',
           '', f'Command: `{cmd.strip()}`', '',
           f'Device: {meta["device"]}; jax {jax.__version__}; layers '
           f'`{meta["layers_impl"]}`; {args.steps} steps of batch {batch}, '
           f'median of {args.repeats}; student `{SPEC}`.', '',
           '| n | vmap (ms/step) | unrolled (ms/step) | sequential (ms/step) '
           '| auto | auto vs sequential |', '|---|---|---|---|---|---|']
  for r in rows:
    ms = lambda s, r=r: f'{1000 * r[s] / args.steps:.1f}'
    lines.append(f'| {r["n"]} | {ms("vmap")} | {ms("unrolled")} | '
                 f'{ms("sequential")} | {r["auto"]} | '
                 f'{r["speedup_auto_vs_sequential"]:.2f}x |')
  with open(stem + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
