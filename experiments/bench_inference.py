"""Benchmark (paper Table 5): inference latency of assembled TCNs, the KD
students and the teacher.

Assembled TCNs for n = 1, 2, 4, 8 (`assemble.TCN` + `make_predict`, strategy
`auto`; randomly initialised students of the Fashion-MNIST paper
architectures, the teacher's head) and the teacher itself, at batch 1 and
batch 256 on real Fashion-MNIST test images. Also one n = 4 student alone:
the latency of the paper's setting, where the students run in parallel on
separate machines (paper Table 5: teacher .171 s, TCN n = 4 .082 s), and
the Hinton KD student sized for each n (the KDGAN student has the same
architecture). On
CPU, also the teacher and TCN n = 4 with XLA's own convolution and pooling
(`impl='xla'`) instead of the im2col path that `auto` picks there.

Latency = one call of the jitted function, result ready; median over all
calls. Calls are interleaved by rounds (each round: `--calls` calls of each
model in turn, the order rotating), with `os.getloadavg()` before and after
each model's calls. FLOPs per image come from XLA's cost analysis.

Writes experiments/results/bench_inference_<backend>.{md,json}.

  python -m experiments.bench_inference [--rounds 12] [--calls 20,2]
"""
import argparse
import dataclasses
import os
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
from tcn_jax import layers
from tcn_jax import models

NS = (1, 2, 4, 8)
BATCHES = (1, 256)


def for_n(n):
  """configs/fashion_mnist.py resolved for n students (plain data)."""
  return common.paper_config(n)


CONFIG = for_n(4)


def make_models(x1):
  """({name: jitted images -> outputs}, {KD name: parameter count}): the
  teacher, TCN n for NS, one n = 4 student alone and the KD students."""
  teacher = models.Teacher(CONFIG['teacher']['body'], 10,
                           CONFIG['teacher']['head_dropout'])
  t_params = teacher.init(jax.random.key(0), x1)['params']
  out = {'teacher': jax.jit(lambda x: teacher.apply({'params': t_params}, x))}
  if layers.resolve_impl('auto') != 'xla':   # XLA's own conv / pooling.
    teacher_xla = models.Teacher(CONFIG['teacher']['body'], 10,
                                 CONFIG['teacher']['head_dropout'], impl='xla')
    out['teacher_xla'] = jax.jit(
        lambda x: teacher_xla.apply({'params': t_params}, x))
  for n in NS:
    spec = for_n(n)['students']['arch']
    groups = assemble.group_students([spec] * n,
                                     chunking.chunk_sizes(256, n))
    for g in groups:
      model = g.model()
      g.variables = {'params': engine.init_group(
          lambda k, model=model: model.init(k, x1)['params'], n, g.member_ids)}
    dropout = float(for_n(n)['head']['dropout'])
    head = assemble.teacher_head({'params': t_params})
    tcn = assemble.TCN(groups, 10, dropout, head_variables=head)
    out[f'tcn_n{n}'] = assemble.make_predict(tcn)
    if n == 4 and engine.resolve_strategy('auto') != 'vmap':
      out['tcn_n4_vmap'] = assemble.make_predict(tcn, 'vmap')
    if n == 4 and layers.resolve_impl('auto') != 'xla':
      out['tcn_n4_xla'] = assemble.make_predict(
          dataclasses.replace(tcn, impl='xla'))
  student = models.student(for_n(4)['students']['arch'],
                           chunking.chunk_sizes(256, 4)[0])
  s_params = student.init(jax.random.key(1), x1)['params']
  out['one_n4_student'] = jax.jit(
      lambda x: student.apply({'params': s_params}, x))
  params = {}
  for n in NS:   # Hinton KD students (also KDGAN's), sized for each n.
    kd = models.Net(f"{for_n(n)['kd']['arch']} D10")
    kd_params = kd.init(jax.random.key(2), x1)['params']
    params[f'kd_n{n}'] = models.num_params(kd_params)
    out[f'kd_n{n}'] = jax.jit(
        lambda x, kd=kd, p=kd_params: kd.apply({'params': p}, x))
  return out, params


def bench_batch(fns, x, rounds, calls):
  """Interleaved rounds; per model all call latencies and per-round loads."""
  names = list(fns)
  lat = {k: [] for k in names}
  rounds_log = {k: [] for k in names}
  for r in range(rounds):
    for k in names[r % len(names):] + names[:r % len(names)]:
      f = fns[k]
      before = bs.loadavg()
      ts = []
      for _ in range(calls):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
      lat[k] += ts
      rounds_log[k].append({'median_s': float(np.median(ts)),
                            'load_before': before, 'load_after': bs.loadavg()})
  return lat, rounds_log


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--rounds', type=int, default=12)
  ap.add_argument('--calls', default='20,2',
                  help='calls per model per round at batch 1, 256')
  args = ap.parse_args()
  calls = dict(zip(BATCHES, (int(c) for c in args.calls.split(','))))
  ds = tcn_jax.load_dataset('fashion_mnist')
  bs.log(f'data: {ds.source}, test {ds.test.x.shape}')
  fns, n_params = make_models(jnp.asarray(ds.test.x[:1]))
  results = {}
  for batch in BATCHES:
    x = jnp.asarray(ds.test.x[:batch])
    flops, compile_s = {}, {}
    for k, f in fns.items():
      t = time.perf_counter()
      f(x).block_until_ready()   # Compile.
      compile_s[k] = time.perf_counter() - t
      flops[k] = bs.flops_of(f, x)
    bs.log(f'batch {batch}: {args.rounds} rounds x {calls[batch]} calls')
    lat, rounds_log = bench_batch(fns, x, args.rounds, calls[batch])
    med = {k: float(np.median(v)) for k, v in lat.items()}
    results[batch] = {
        'median_ms': {k: 1000 * v for k, v in med.items()},
        'vs_teacher': {k: v / med['teacher'] for k, v in med.items()},
        'flops_per_image': {k: v / batch for k, v in flops.items()},
        'compile_plus_first_call_s': compile_s,
        'p10_p90_ms': {k: [1000 * float(np.percentile(v, 10)),
                           1000 * float(np.percentile(v, 90))]
                       for k, v in lat.items()},
        'rounds': rounds_log}
    bs.log({k: f'{v:.2f} ms' for k, v in results[batch]['median_ms'].items()})

  meta = bs.meta_info(command=bs.command(), rounds=args.rounds, calls=calls,
                      data=ds.source, teacher=CONFIG['teacher']['body'],
                      students={str(n): bs.spec_for(n)
                                for n in NS},
                      paper_table5_fmnist_s=paper.TABLE5)
  names = list(fns)
  label = {'teacher': 'teacher', 'one_n4_student': 'one n=4 student alone '
           '(students in parallel, paper setting)',
           'tcn_n4_vmap': 'TCN n=4, strategy vmap',
           'teacher_xla': 'teacher, XLA convolution / pooling (`impl=xla`)',
           'tcn_n4_xla': 'TCN n=4, XLA convolution / pooling (`impl=xla`)',
           **{f'tcn_n{n}': f'TCN n={n} (all students in one program)'
              for n in NS},
           **{f'kd_n{n}': f'KD / KDGAN student sized for n={n} '
              f'({n_params[f"kd_n{n}"] / 1e3:.1f}k '
              'params)' for n in NS}}
  lines = [f'# Inference latency: assembled TCN vs teacher ({meta["backend"]})',
           '', f'Command: `{meta["command"]}`', '',
           f'Device: {meta["device"]} ({meta["cpu_count"]} cores, shared); '
           f'jax {jax.__version__}; layers `{meta["layers_impl"]}`; '
           f'`make_predict` strategy `auto` = {meta["auto_strategy"]}. '
           'Randomly initialised students of the paper architectures with '
           'the teacher\'s head; real test images. Median latency of one '
           f'call over {args.rounds} interleaved rounds x '
           f'{calls[1]} (batch 1) / {calls[256]} (batch 256) calls; '
           'p10-p90 in the JSON.', '',
           '| model | MFLOP/image | batch 1 (ms) | vs teacher | batch 256 (ms) '
           '| vs teacher |', '|---|---|---|---|---|---|']
  for k in names:
    r1, r256 = results[1], results[256]
    lines.append(f'| {label[k]} | {r1["flops_per_image"][k] / 1e6:.1f} | '
                 f'{r1["median_ms"][k]:.3f} | {r1["vs_teacher"][k]:.2f}x | '
                 f'{r256["median_ms"][k]:.1f} | '
                 f'{r256["vs_teacher"][k]:.2f}x |')
  lines += ['', 'Target: TCN n = 4 <= 0.5x the teacher\'s latency (paper '
            f'Table 5, F-MNIST: teacher {paper.TABLE5["teacher"]} s, n = 4 '
            f'{paper.TABLE5["tcn_n4"]} s, students on separate machines).']
  bs.write_results(os.path.join(bs.RESULTS,
                                f'bench_inference_{meta["backend"]}'),
                   {'meta': meta, 'results': {str(b): r for b, r in
                                              results.items()}}, lines)


if __name__ == '__main__':
  main()
