"""Benchmark: serving the teacher and assembled TCNs on this machine, from
Python and from their exported files (issue: export and inference table).

Models: the Fashion-MNIST teacher; TCNs of the paper's students for
n = 1, 2, 4, 8 (`configs/fashion_mnist.py`) and of the best recipe's
(`configs/fashion_mnist.py:best`: n = 2, wide + BatchNorm students, a PCA
basis); and one best-recipe student alone (students served on separate
devices, the paper's setting). Weights are randomly initialised (latency
does not depend on their values; the PCA basis is a random orthogonal
matrix); inputs are real Fashion-MNIST test images.

Paths, each model at batch 1 and 256:
  jit im2col   jitted apply with the im2col convolution (`impl='im2col'`,
               what training uses on the CPU; `make_predict`'s path before)
  make_predict `assemble.make_predict` (teacher: jitted apply) with its
               default path, XLA's own convolution (`layers.forward_impl`)
  stablehlo    the `tcn.export` file, deserialized, `jax.jit(exported.call)`
  onnxruntime  the ONNX file in onnxruntime (CPU provider, default threads)

Latency = one call, result ready; median over interleaved rounds (each
round: `--calls` calls of every model and path in turn, the order
rotating). os.getloadavg() is recorded per round (the machine is shared).

Writes experiments/results/bench_serving_<backend>.{md,json}.

  flock /work/bench.lock python -m experiments.bench_serving [--rounds 8] [--calls 20,2]
"""
import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_students as bs
from experiments import common
from experiments import paper
import tcn_jax
from tcn_jax import assemble
from tcn_jax import chunking
from tcn_jax import engine
from tcn_jax import models
from tcn_jax.export import export
from tcn_jax.export import FORMATS
from tcn_jax.export import load

BATCHES = (1, 256)
PATHS = ('jit im2col', 'make_predict', 'stablehlo', 'onnxruntime')
# (row name, n, preset of configs/fashion_mnist.py)
TCNS = (('TCN n=1', 1, ''), ('TCN n=2', 2, ''), ('TCN n=4', 4, ''),
        ('TCN n=8', 8, ''), ('TCN best (n=2)', 2, 'best'))


def random_tcn(n, preset, teacher_params, x1):
  """A TCN of the config's students, randomly initialised, with the
  teacher's head (and a random orthogonal PCA basis for chunking=pca)."""
  cfg = common.paper_config(n, preset)
  s = cfg['students']
  width = 256
  groups = assemble.group_students([s['arch']] * n,
                                   chunking.chunk_sizes(width, n),
                                   s['out_relu'], s['init'])
  for g in groups:
    model = g.model()
    g.variables = engine.init_group(lambda k, m=model: m.init(k, x1), 0,
                                    g.member_ids)
  basis = None
  if cfg['chunking'] == 'pca':
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(width, width)))
    basis = {'matrix': jnp.asarray(q, jnp.float32),
             'mean': jnp.zeros(width, jnp.float32)}
  head = assemble.teacher_head({'params': teacher_params})
  return assemble.TCN(groups, 10, float(cfg['head']['dropout']), head,
                      basis=basis), cfg


def _files(fn, tmp, name):
  """{'stablehlo': callable, 'onnxruntime': callable} of `fn` exported."""
  out = {}
  for fmt, label in (('stablehlo', 'stablehlo'), ('onnx', 'onnxruntime')):
    path = os.path.join(tmp, f'{name}.{fmt}')
    with open(path, 'wb') as f:
      f.write(FORMATS.get(fmt)(fn, (None, 28, 28, 1), np.float32))
    out[label] = _runner(path)
  return out


def _runner(path):
  if path.endswith('.stablehlo'):
    with open(path, 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    return jax.jit(exported.call)
  return load(path)


def make_models(x1, tmp):
  """{row: {path: callable}}, {row: info}."""
  t_cfg = common.paper_config(4)['teacher']
  teacher = {impl: models.Teacher(t_cfg['body'], 10, t_cfg['head_dropout'],
                                  impl=impl) for impl in ('im2col', 'xla')}
  t_params = teacher['xla'].init(jax.random.key(0), x1)['params']
  t_fn = {impl: jax.jit(lambda x, m=m: m.apply({'params': t_params}, x))
          for impl, m in teacher.items()}
  rows = {'teacher': {'jit im2col': t_fn['im2col'],
                      'make_predict': t_fn['xla'],
                      **_files(t_fn['xla'], tmp, 'teacher')}}
  info = {'teacher': {'arch': t_cfg['body'],
                      'params': models.num_params(t_params)}}
  for row, n, preset in TCNS:
    net, cfg = random_tcn(n, preset, t_params, x1)
    rows[row] = {'jit im2col': assemble.make_predict(net, impl='im2col'),
                 'make_predict': assemble.make_predict(net)}
    stem = row.replace(' ', '_').replace('(', '').replace(')', '')
    for fmt, label in (('stablehlo', 'stablehlo'), ('onnx', 'onnxruntime')):
      path = export(net, os.path.join(tmp, f'{stem}.{fmt}'), fmt,
                    input_shape=(28, 28, 1))
      rows[row][label] = _runner(path)
    info[row] = {'n': n, 'preset': preset, 'arch': cfg['students']['arch'],
                 'chunking': cfg['chunking'],
                 'params_students': sum(
                     models.num_params(g.variables['params'])
                     for g in net.groups)}
    if preset == 'best':   # One student alone: students on separate devices.
      one = 'one best student alone'
      rows[one] = {}
      g = net.groups[0]
      variables = engine.unstack(g.variables, len(g.member_ids))[0]
      for impl, label in (('im2col', 'jit im2col'), ('xla', 'make_predict')):
        model = g.model(impl)
        rows[one][label] = jax.jit(
            lambda x, m=model: m.apply(variables, x))
      for fmt, label in (('stablehlo', 'stablehlo'), ('onnx', 'onnxruntime')):
        path = export(net, os.path.join(tmp, f'best_student0.{fmt}'), fmt,
                      input_shape=(28, 28, 1), student=0)
        rows[one][label] = _runner(path)
      info[one] = {'arch': g.spec, 'out_dim': g.out_dim,
                   'params': models.num_params(variables['params'])}
  return rows, info


def _call(f, x):
  out = f(x)
  if hasattr(out, 'block_until_ready'):
    out.block_until_ready()
  return out


def bench(fns, inputs, rounds, calls):
  """Interleaved rounds over every (row, path); all latencies and loads."""
  keys = list(fns)
  lat = {k: [] for k in keys}
  loads = []
  for r in range(rounds):
    loads.append(bs.loadavg())
    for k in keys[r % len(keys):] + keys[:r % len(keys)]:
      f, x = fns[k], inputs[k[1]]
      for _ in range(calls):
        t = time.perf_counter()
        _call(f, x)
        lat[k].append(time.perf_counter() - t)
  return lat, loads


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--rounds', type=int, default=8)
  ap.add_argument('--calls', default='20,2',
                  help='calls per model and path per round at batch 1, 256')
  ap.add_argument('--suffix', default='',
                  help='results file suffix, e.g. for a run under other '
                  'XLA_FLAGS (recorded in the results)')
  args = ap.parse_args()
  calls = dict(zip(BATCHES, (int(c) for c in args.calls.split(','))))
  ds = tcn_jax.load_dataset('fashion_mnist')
  x_all = ds.test.x
  bs.log(f'data: {ds.source}; building and exporting')
  with tempfile.TemporaryDirectory() as tmp:
    rows, info = make_models(jnp.asarray(x_all[:1]), tmp)
    fns = {(row, path): f for row, paths in rows.items()
           for path, f in paths.items()}
    results = {}
    for batch in BATCHES:
      inputs = {'jit im2col': jnp.asarray(x_all[:batch]),
                'make_predict': jnp.asarray(x_all[:batch]),
                'stablehlo': jnp.asarray(x_all[:batch]),
                'onnxruntime': np.asarray(x_all[:batch])}
      ref = {row: np.asarray(_call(rows[row]['jit im2col'],
                                   inputs['jit im2col'])) for row in rows}
      max_diff = {}
      for (row, path), f in fns.items():   # Compile, and check the outputs.
        out = np.asarray(_call(f, inputs[path]))
        max_diff[f'{row} | {path}'] = float(np.abs(out - ref[row]).max())
      bs.log(f'batch {batch}: {args.rounds} rounds x {calls[batch]} calls; '
             f'largest difference to jit im2col {max(max_diff.values()):.2e}')
      lat, loads = bench(fns, inputs, args.rounds, calls[batch])
      med = {k: float(np.median(v)) for k, v in lat.items()}
      results[batch] = {
          'median_ms': {f'{r} | {p}': 1e3 * v for (r, p), v in med.items()},
          'p10_p90_ms': {f'{r} | {p}': [1e3 * float(np.percentile(v, q))
                                        for q in (10, 90)]
                         for (r, p), v in lat.items()},
          'max_abs_diff_vs_jit_im2col': max_diff, 'loadavg_per_round': loads}
      bs.log({k: f'{v:.2f}' for k, v in results[batch]['median_ms'].items()})
  meta = bs.meta_info(command=bs.command(), rounds=args.rounds, calls=calls,
                      data=ds.source, models=info,
                      onnxruntime=__import__('onnxruntime').__version__,
                      paper_table5_fmnist_s=paper.TABLE5,
                      loadavg_end=bs.loadavg())
  bs.write_results(os.path.join(bs.RESULTS,
                                f'bench_serving_{meta["backend"]}'
                                + (f'_{args.suffix}' if args.suffix else '')),
                   {'meta': meta, 'results': {str(b): r for b, r in
                                              results.items()}},
                   markdown(meta, results, rows, args, calls))


def markdown(meta, results, rows, args, calls):
  """The table: ms per call, and each TCN path over the teacher's same
  path."""
  def ms(b, row, path):
    return results[b]['median_ms'][f'{row} | {path}']

  lines = [f'# Serving latency: teacher vs TCN, from Python and exported '
           f'({meta["backend"]})', '', f'Command: `{meta["command"]}`', '',
           f'Device: {meta["device"]} ({meta["cpu_count"]} cores, shared; '
           f'load average {meta["loadavg_end"]} at the end, per round in '
           f'the JSON); jax {meta["jax"]}, onnxruntime '
           f'{meta["onnxruntime"]}'
           + (f'; XLA_FLAGS=`{meta["xla_flags"]}`' if meta['xla_flags']
              else '') + '. Randomly initialised weights (latency '
           'does not depend on their values), real test images. Median of '
           f'{args.rounds} interleaved rounds x {calls[1]} (batch 1) / '
           f'{calls[256]} (batch 256) calls. `jit im2col`: the im2col '
           'convolution that training uses on the CPU (`make_predict`\'s '
           'path before); `make_predict`: its default now, XLA\'s '
           'convolution (teacher: its jitted apply on that path); '
           '`stablehlo`: the `tcn.export` file run by '
           '`jax.jit(exported.call)`; `onnxruntime`: the ONNX file. '
           '"x T" = over the teacher on the same path.', '']
  for b in BATCHES:
    lines += [f'## Batch {b} (ms per call)', '',
              '| model | ' + ' | '.join(PATHS) + ' |',
              '|---|' + '---|' * len(PATHS)]
    for row in rows:
      cells = []
      for p in PATHS:
        v, t = ms(b, row, p), ms(b, 'teacher', p)
        cells.append(f'{v:.3f}' if row == 'teacher' else
                     f'{v:.3f} ({v / t:.2f}x T)')
      lines.append(f'| {row} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  best = 'TCN best (n=2)'
  lines += ['## Target', '',
            'The best-accuracy TCN (`:best`) at most 0.5x the teacher\'s '
            'latency at batch 1, and no slower at batch 256 (paper Table 5, '
            f'F-MNIST: teacher {paper.TABLE5["teacher"]} s, TCN n = 4 '
            f'{paper.TABLE5["tcn_n4"]} s):', '',
            '| path | batch 1: TCN best / teacher | met? | batch 256: TCN best '
            '/ teacher | met? |', '|---|---|---|---|---|']
  for p in PATHS:
    r1 = ms(1, best, p) / ms(1, 'teacher', p)
    r256 = ms(256, best, p) / ms(256, 'teacher', p)
    lines.append(f'| {p} | {r1:.2f}x | {"yes" if r1 <= 0.5 else "no"} | '
                 f'{r256:.2f}x | {"yes" if r256 <= 1.0 else "no"} |')
  lines += ['', 'TCNs run their students one after another in one program '
            '(`make_predict` strategy `auto` = unrolled on the CPU; vmap '
            'measured 2-9x slower at batch 256 with XLA\'s convolution). '
            'On separate devices (the paper\'s setting) a TCN takes about '
            'its slowest student plus the head: the "one best student '
            'alone" row.']
  fastest_t = {b: min(ms(b, 'teacher', p) for p in PATHS) for b in BATCHES}
  fastest_b = {b: min(ms(b, best, p) for p in PATHS) for b in BATCHES}
  lines += ['', 'Fastest path each: teacher '
            f'{fastest_t[1]:.3f} ms (batch 1), {fastest_t[256]:.1f} ms '
            f'(batch 256); TCN best {fastest_b[1]:.3f} ms, '
            f'{fastest_b[256]:.1f} ms: {fastest_b[1] / fastest_t[1]:.2f}x '
            f'and {fastest_b[256] / fastest_t[256]:.2f}x.']
  return lines


if __name__ == '__main__':
  main()
