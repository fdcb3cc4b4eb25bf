"""Benchmark: compute dtype (float32 vs bfloat16) and n students in one program.

The accelerator checks of the mesh / mixed-precision work, in one process:

1. The paper's n = `--n` Fashion-MNIST students (batch 128) trained in one
   compiled program (the engine's 'auto' strategy) vs one after another (a
   program for one student run for each in turn), in float32 and in
   bfloat16 (`config.dtype`: parameters and optimizer state stay float32).
2. The Fashion-MNIST teacher's training step in float32 vs bfloat16.

All variants run interleaved round by round (medians of paired ratios, with
os.getloadavg() around each sample). Achieved FLOP/s (XLA's cost analysis of
a one-step program) is given as a fraction of a measured 2048^2 matmul in
the same dtype and, with `--peak-tflops f32,bf16`, of the device's nominal
peak.

Writes experiments/results/bench_precision_<backend>.{md,json}.

  python -m experiments.bench_precision [--steps 20] [--repeats 3] [--n 8]
  # one H200 (dense peaks of the spec sheet):
  python -m experiments.bench_precision --steps 200 --peak-tflops 67,989
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import tcn_jax
from experiments import bench_students as bs
from experiments import common
from tcn_jax import chunking
from tcn_jax import losses
from tcn_jax import models

DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}


def matmul_flops(dtype, repeats=5):
  """Median FLOP/s of a jitted MATMUL^2 matmul in `dtype` (float32 out)."""
  m = bs.MATMUL
  a = jnp.asarray(np.random.default_rng(0).random((m, m), np.float32),
                  dtype or jnp.float32)
  mm = jax.jit(lambda a, b: jnp.matmul(a, b,
                                       preferred_element_type=jnp.float32))
  mm(a, a).block_until_ready()
  samples = [bs.timed(lambda: mm(a, a).block_until_ready())
             for _ in range(repeats)]
  return 2 * m ** 3 / bs.median_s(samples)


def student_variants(n, x, steps):
  """{name: Group-like with run() / flops_per_step()} for both dtypes."""
  width = chunking.chunk_sizes(256, n)[0]
  spec = bs.spec_for(n)
  rng = np.random.default_rng(n)
  targets = jnp.asarray(np.maximum(
      rng.standard_normal((n, len(x), width), np.float32), 0))
  out = {}
  for name, dt in DTYPES.items():
    make = lambda ids, fn=None, dt=dt: bs.Group(
        models.student(spec, width, dtype=dt), losses.mse, ids, 'auto', x,
        targets[np.asarray(list(ids))], steps, epoch_fn=fn)
    out[f'students_one_program_{name}'] = make(range(n))
    first = make([0])
    seq = bs.Sequential.__new__(bs.Sequential)
    seq.members = [first] + [make([i], first.epoch_fn) for i in range(1, n)]
    out[f'students_sequential_{name}'] = seq
  return out


def teacher_variants(x, y, steps):
  body = common.paper_config(1)['teacher']['body']
  return {f'teacher_{name}': bs.Group(
      models.Teacher(body, 10, dtype=dt), losses.classification, [0], 'auto',
      x, {'label': y[None]}, steps) for name, dt in DTYPES.items()}


def flops(v):
  if hasattr(v, 'flops_per_step'):
    return v.flops_per_step()
  return sum(m.flops_per_step() for m in v.members)   # Sequential.


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--steps', type=int, default=20)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--n', type=int, default=8)
  ap.add_argument('--train-size', type=int, default=0)
  ap.add_argument('--peak-tflops', default='',
                  help='nominal float32,bfloat16 peaks of the device')
  args = ap.parse_args()
  ds = tcn_jax.load_dataset('fashion_mnist', train_size=args.train_size)
  x = jnp.asarray(ds.train.x[:bs.BATCH * args.steps])
  y = jnp.asarray(ds.train.y[:bs.BATCH * args.steps])
  variants = {**student_variants(args.n, x, args.steps),
              **teacher_variants(x, y, args.steps)}
  fl, first = {}, {}
  for k, v in variants.items():
    bs.log(f'{k}: compiling + first run')
    first[k] = bs.timed(v.run)['s']
    fl[k] = flops(v)
  samples = bs.interleaved({k: v.run for k, v in variants.items()},
                           args.repeats, bs.log)
  sec = {k: bs.median_s(s) for k, s in samples.items()}
  mm = {name: matmul_flops(dt) for name, dt in DTYPES.items()}
  peaks = dict(zip(DTYPES, (float(p) * 1e12 for p in
                            args.peak_tflops.split(',')))) \
      if args.peak_tflops else {}
  rows = {}
  for k in variants:
    dt = k.rsplit('_', 1)[1]
    achieved = fl[k] * args.steps / sec[k]
    rows[k] = {'s_per_step': sec[k] / args.steps, 'flops_per_step': fl[k],
               'achieved_flops_per_s': achieved,
               'fraction_of_matmul': achieved / mm[dt],
               'fraction_of_peak': achieved / peaks[dt] if peaks else None,
               'first_call_s': first[k]}
  ratio = lambda a, b: bs.paired_ratio(samples[a], samples[b])
  summary = {
      f'one_program_speedup_{d}': ratio(f'students_sequential_{d}',
                                        f'students_one_program_{d}')
      for d in DTYPES}
  summary['teacher_bf16_speedup'] = ratio('teacher_float32',
                                          'teacher_bfloat16')
  summary['students_bf16_speedup'] = ratio('students_one_program_float32',
                                           'students_one_program_bfloat16')
  backend = jax.default_backend()
  meta = bs.meta_info(command=bs.command(), steps=args.steps,
                      repeats=args.repeats, n=args.n, batch=bs.BATCH,
                      matmul_flops_per_s=mm, peak_flops_per_s=peaks)
  lines = [f'# Compute dtype and one program vs one after another '
           f'({backend})', '',
           f'Command: `{meta["command"]}`', '',
           f'Device: {meta["device"]}; jax {jax.__version__}; '
           f'{time.strftime("%Y-%m-%d")}. n = {args.n} paper students and '
           f'the paper teacher on real Fashion-MNIST, batch {bs.BATCH}, '
           f'{args.steps} steps per sample, median of {args.repeats} '
           'interleaved rounds (ratios: median of per-round ratios).', '',
           '| variant | ms/step | achieved TFLOP/s | of matmul | of peak |',
           '|---|---|---|---|---|']
  for k, r in rows.items():
    peak = (f'{r["fraction_of_peak"]:.3f}' if r['fraction_of_peak']
            is not None else 'n/a')
    lines.append(f'| {k} | {1e3 * r["s_per_step"]:.2f} | '
                 f'{r["achieved_flops_per_s"] / 1e12:.4f} | '
                 f'{r["fraction_of_matmul"]:.3f} | {peak} |')
  lines += ['', '| ratio | measured | target (one H200) |', '|---|---|---|',
            f'| n = {args.n} one program vs one after another, float32 | '
            f'{summary["one_program_speedup_float32"]:.2f}x | >= 3x |',
            f'| n = {args.n} one program vs one after another, bfloat16 | '
            f'{summary["one_program_speedup_bfloat16"]:.2f}x | >= 3x |',
            f'| teacher step, bfloat16 vs float32 | '
            f'{summary["teacher_bf16_speedup"]:.2f}x | >= 1.5x |',
            f'| students (one program), bfloat16 vs float32 | '
            f'{summary["students_bf16_speedup"]:.2f}x | |']
  bs.write_results(f'{bs.RESULTS}/bench_precision_{backend}',
                   {'meta': meta, 'rows': rows, 'summary': summary,
                    'samples': samples}, lines)


if __name__ == '__main__':
  main()
