"""Benchmark: n students trained in one program vs one after another.

For the Fashion-MNIST paper students (configs/fashion_mnist.py
STUDENTS_FMNIST, output widths 256/n, batch 128) on the real training
images, times `--steps` training steps of every strategy in
`engine.STRATEGIES` (one compiled program for all n students) and of the same
code training the students one after another (a program for one student, run
for each student in turn), all in this one process. Measurements are
interleaved round by round (A, B, C, A, B, C, ...) and the medians are
reported, with `os.getloadavg()` before and after each one, so ratios stay
fair on a shared machine. Each round also times a float32 2048x2048 matmul:
achieved FLOP/s of student training (FLOPs from XLA's cost analysis of the
compiled one-step program) is reported as a fraction of it.

`--analyze` (default on) adds where a single student's step goes: every
matmul of its forward + backward pass (from the jaxpr) timed alone, and the
step with XLA's own convolution instead of the library's im2col one.

Writes experiments/results/bench_students_<backend>.{md,json}; after each n
the finished rows go to a .partial.json that a rerun with the same arguments
resumes from.

`--host-devices N` makes XLA:CPU show N devices, so that 'sharded' splits
the students over them (the other strategies use one device either way).
Speedups are the median over rounds of the ratio of the two times measured
in the same round.

  python -m experiments.bench_students [--steps 10] [--repeats 3] [--ns 1,2,4,8] [--host-devices 2]
"""
import argparse
import json
import os
import platform
import sys
import time


def _host_devices():
  """--host-devices N: XLA:CPU shows N devices (for 'sharded'); must be set
  before jax is imported."""
  for i, a in enumerate(sys.argv):
    if a.startswith('--host-devices'):
      n = a.split('=', 1)[1] if '=' in a else sys.argv[i + 1]
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                                 f' --xla_force_host_platform_device_count={n}')


if __name__ == '__main__':
  _host_devices()

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from experiments import common  # pylint: disable=g-import-not-at-top
import tcn_jax
from tcn_jax import chunking
from tcn_jax import engine
from tcn_jax import fit
from tcn_jax import input_pipeline
from tcn_jax import layers
from tcn_jax import losses
from tcn_jax import models
from tcn_jax import optim
from tcn_jax.state import MemberState

RESULTS = common.RESULTS
BATCH = 128
MATMUL = 2048


# ---------------------------------------------------------------- helpers
# (bench_keras.py and bench_inference.py import these.)

def loadavg():
  return [round(v, 2) for v in os.getloadavg()]


def timed(fn):
  """Runs fn() once; {'s': seconds, 'load_before', 'load_after'}."""
  before = loadavg()
  t = time.perf_counter()
  fn()
  seconds = time.perf_counter() - t
  return {'s': seconds, 'load_before': before, 'load_after': loadavg()}


def median_s(samples):
  return float(np.median([s['s'] for s in samples]))


def paired_ratio(a, b):
  """Median over rounds of a[r] / b[r] (samples from `interleaved`)."""
  return float(np.median([x['s'] / y['s'] for x, y in zip(a, b)]))


def interleaved(fns, repeats, log=None):
  """Times each of `fns` ({name: fn}) once per round, for `repeats` rounds,
  the order rotating each round; returns {name: [samples]}."""
  names = list(fns)
  out = {k: [] for k in names}
  for r in range(repeats):
    for k in names[r % len(names):] + names[:r % len(names)]:
      out[k].append(timed(fns[k]))
      if log:
        log(f'  round {r + 1}/{repeats} {k}: {out[k][-1]["s"]:.3f} s '
            f'(load {out[k][-1]["load_after"][0]})')
  return out


def matmul_bench(repeats=5):
  """Median FLOP/s of a jitted float32 MATMUL x MATMUL matmul, and samples."""
  a = jnp.asarray(np.random.default_rng(0).random((MATMUL, MATMUL),
                                                 np.float32))
  mm = jax.jit(lambda a, b: a @ b)
  mm(a, a).block_until_ready()
  samples = [timed(lambda: mm(a, a).block_until_ready())
             for _ in range(repeats)]
  return 2 * MATMUL ** 3 / median_s(samples), samples


def flops_of(jitted, *args):
  """FLOPs XLA's cost analysis gives for `jitted` compiled for `args`."""
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):   # Older jax: one dict per device.
    cost = cost[0]
  return float(cost['flops'])


def command():
  """`python -m experiments.<the script run> ARGS`."""
  return common.command(quote=False)


def meta_info(**extra):
  return {'backend': jax.default_backend(), 'device': str(jax.devices()[0]),
          'num_devices': jax.device_count(),
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'cpu_count': os.cpu_count(), 'platform': platform.platform(),
          'python': platform.python_version(), 'jax': jax.__version__,
          'layers_impl': layers.resolve_impl('auto'),
          'auto_strategy': engine.resolve_strategy('auto'),
          'date': time.strftime('%Y-%m-%d %H:%M:%S'), **extra}


def write_results(stem, doc, lines):
  os.makedirs(RESULTS, exist_ok=True)
  with open(stem + '.json', 'w') as f:
    json.dump(doc, f, indent=2)
  with open(stem + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  print(f'wrote {stem}.md and {stem}.json')


def log(msg):
  print(time.strftime('%H:%M:%S'), msg, flush=True)


# ------------------------------------------------------------ the groups

def spec_for(n):
  """The paper's student trunk for n (configs/fashion_mnist.py, resolved)."""
  return common.paper_config(n)['students']['arch']


class Group:
  """Members `ids` of `model` trained with the engine as fit.fit does it
  (same loss wrapper, optimizer, keys and batch order): `run()` trains
  `steps` more batches of `x`; targets are (members, N, ...)."""

  def __init__(self, model, loss, ids, strategy, x, targets, steps,
               batch=BATCH, epoch_fn=None):
    self.model, self.loss = model, loss
    self.ids, self.x, self.steps, self.batch = list(ids), x, steps, batch
    self.targets = targets
    init = lambda k: model.init(k, x[:1])['params']
    self.params = engine.init_group(init, 0, self.ids)
    self.tx = optim.make_optimizer('adam', 1e-3, 'optimizer')
    self.opt_state = jax.vmap(self.tx.init)(self.params)
    self.keys = engine.member_keys(0, self.ids)
    self.epoch, self.strategy = 0, strategy
    self.epoch_fn = epoch_fn or engine.make_epoch_fn(
        self.loss_fn, self.tx, len(self.ids), strategy)

  def loss_fn(self, p, xb, tb, key):
    pred = self.model.apply({'params': p}, xb, train=True,
                            rngs={'dropout': key})
    return self.loss(pred, tb)

  def order(self, steps):
    return input_pipeline.batch_order(0, self.epoch, len(self.x), self.batch)[:steps]

  def run(self):
    self.params, self.opt_state, loss = self.epoch_fn(
        self.params, self.opt_state, self.x, self.targets,
        self.order(self.steps), self.keys, self.epoch)
    self.epoch += 1
    loss.block_until_ready()
    return loss

  def compile_seconds(self):
    """Seconds to lower and compile the jitted group epoch that
    make_epoch_fn runs (ahead of time, for `steps` steps); None where the
    strategy's epoch is not one jitted function ('sharded' on a mesh)."""
    trainer = engine.Trainer(engine.gradient_step(self.loss_fn, self.tx),
                             len(self.ids), self.strategy)
    if trainer.mesh.size > 1:
      return None
    _, fn = trainer.program(self.batch, True)
    state = MemberState(self.params, self.opt_state)
    t = time.perf_counter()
    fn.lower(state, (self.x, self.targets, self.order(self.steps)),
             self.keys, 0, 0, None).compile()
    return time.perf_counter() - t

  def flops_per_step(self):
    """XLA's FLOPs for one step of the group (a one-step program: the cost
    analysis counts a loop body once, whatever its trip count)."""
    fn = jax.jit(lambda p, o, x, t, order, k: self.epoch_fn(
        p, o, x, t, order, k, 0))
    return flops_of(fn, self.params, self.opt_state, self.x, self.targets,
                    self.order(1), self.keys)


def student_group(spec, width, ids, strategy, x, all_targets, steps,
                  epoch_fn=None, impl='auto'):
  """Students `ids` of one width; all_targets: (all students, N, width)."""
  return Group(models.student(spec, width, impl=impl), losses.mse, ids,
               strategy, x, all_targets[np.asarray(list(ids))], steps,
               epoch_fn=epoch_fn)


class Sequential:
  """The n students one after another: a program for one student run for
  each in turn (identical students share its compilation)."""

  def __init__(self, spec, width, n, x, targets, steps):
    first = student_group(spec, width, [0], 'auto', x, targets, steps)
    self.members = [first] + [
        student_group(spec, width, [i], 'auto', x, targets, steps,
                      first.epoch_fn) for i in range(1, n)]

  def run(self):
    for m in self.members:
      m.run()

  def flops_per_step(self):
    return len(self.members) * self.members[0].flops_per_step()

  def compile_seconds(self):
    return self.members[0].compile_seconds()


# --------------------------------------------------------------- one row

def bench_n(n, x, steps, repeats):
  width = chunking.chunk_sizes(256, n)[0]
  spec = spec_for(n)
  rng = np.random.default_rng(n)
  # Stand-in teacher features (post-ReLU, like the real ones): speed does
  # not depend on their values.
  targets = jnp.asarray(np.maximum(
      rng.standard_normal((n, len(x), width), np.float32), 0))
  strategies = [s for s in engine.STRATEGIES if s != 'auto']
  variants = {s: student_group(spec, width, range(n), s, x, targets, steps)
              for s in strategies}
  variants['sequential'] = Sequential(spec, width, n, x, targets, steps)
  row = {'n': n, 'width': width, 'student': spec,
         'auto': engine.resolve_strategy('auto'), 'compile_s': {},
         'flops_per_step': {}}
  first = {}
  for k, v in variants.items():
    log(f'n={n} {k}: compiling + first run')
    first[k] = timed(v.run)['s']
    row['compile_s'][k] = v.compile_seconds()
    try:
      row['flops_per_step'][k] = v.flops_per_step()
    except Exception as e:  # pylint: disable=broad-except
      # A program that places its arrays itself ('sharded' on a mesh) cannot
      # be traced inside another jit: it computes what vmap computes.
      log(f'n={n} {k}: FLOPs taken from vmap ({type(e).__name__})')
      row['flops_per_step'][k] = row['flops_per_step']['vmap']
  log(f'n={n}: {repeats} interleaved rounds of {steps} steps')
  fns = {k: v.run for k, v in variants.items()}
  mm_samples = []

  def matmul():
    flops, samples = matmul_bench()
    mm_samples.extend(samples)
    return flops

  fns['matmul_2048'] = matmul
  samples = interleaved(fns, repeats, log)
  row['samples'] = samples
  row['matmul_samples'] = mm_samples
  row['matmul_flops_per_s'] = 2 * MATMUL ** 3 / median_s(mm_samples)
  row['seconds'] = {k: median_s(samples[k]) for k in variants}
  # Where a compile cannot be timed ahead of time: the first call minus the
  # median warm call (noisy on a loaded machine).
  row['compile_s'] = {k: max(first[k] - row['seconds'][k], 0.0)
                      if v is None else v for k, v in row['compile_s'].items()}
  row['steps_per_s'] = {k: steps / s for k, s in row['seconds'].items()}
  seq = row['seconds']['sequential']
  # Speedup: the median over rounds of sequential / strategy measured in the
  # same round (paired, so a load burst during one round cancels out).
  row['speedup_vs_sequential'] = {k: paired_ratio(samples['sequential'],
                                                  samples[k])
                                  for k in strategies}
  row['speedup_of_medians'] = {k: seq / row['seconds'][k]
                               for k in strategies}
  row['best'] = max(strategies, key=lambda s: row['speedup_vs_sequential'][s])
  row['achieved_flops_per_s'] = {
      k: row['flops_per_step'][k] * steps / row['seconds'][k]
      for k in variants}
  row['fraction_of_matmul'] = {
      k: v / row['matmul_flops_per_s']
      for k, v in row['achieved_flops_per_s'].items()}
  return row


# -------------------------------------------------------------- analysis

def _dot_generals(jaxpr, out):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      out.append((tuple(eqn.invars[0].aval.shape),
                  tuple(eqn.invars[1].aval.shape),
                  eqn.params['dimension_numbers']))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          _dot_generals(inner, out)
  return out


def _dot_flops(lhs, rhs, dims):
  (lc, _), (lb, _) = dims
  k = np.prod([lhs[i] for i in lc])
  b = np.prod([lhs[i] for i in lb])
  m = np.prod(lhs) / k / b
  n = np.prod(rhs) / k / b
  return float(2 * b * m * n * k)


def analyze(x, repeats, n=4):
  """Where one student's training step (n's architecture) goes on this
  backend: each matmul of the step timed alone, and the step itself with the
  library's layers and with XLA's own convolution and pooling."""
  width = chunking.chunk_sizes(256, n)[0]
  spec = spec_for(n)
  rng = np.random.default_rng(0)
  targets = jnp.asarray(np.maximum(
      rng.standard_normal((1, len(x), width), np.float32), 0))
  base = student_group(spec, width, [0], 'auto', x, targets, 1)
  step = engine.gradient_step(base.loss_fn, base.tx)
  state = MemberState(engine.unstack(base.params, 1)[0],
                      engine.unstack(base.opt_state, 1)[0])
  xb, tb = x[:BATCH], targets[0, :BATCH]
  jaxpr = jax.make_jaxpr(step)(state, xb, tb, jax.random.key(0))
  dots = _dot_generals(jaxpr.jaxpr, [])
  fns = {}
  for i, (lhs, rhs, dims) in enumerate(dots):
    a = jnp.asarray(rng.random(lhs, np.float32))
    b = jnp.asarray(rng.random(rhs, np.float32))
    f = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
    f(a, b).block_until_ready()
    fns[f'dot{i}'] = lambda f=f, a=a, b=b: f(a, b).block_until_ready()

  steps = {'library': 10, 'xla_conv': 1}   # XLA's convolutions: slow.
  for k, impl in (('library', 'auto'), ('xla_conv', 'xla')):
    group = student_group(spec, width, [0], 'auto', x, targets, steps[k],
                          impl=impl)
    group.run()   # Compile.
    fns[f'step_{k}'] = group.run
  log(f'analysis: {len(dots)} matmuls + 2 step variants, {repeats} rounds')
  samples = interleaved(fns, repeats)
  out = {'n': n, 'student': spec, 'width': width, 'steps': steps,
         'dots': [], 'samples': samples}
  for i, (lhs, rhs, dims) in enumerate(dots):
    s = median_s(samples[f'dot{i}'])
    fl = _dot_flops(lhs, rhs, dims)
    out['dots'].append({'lhs': lhs, 'rhs': rhs,
                        'contract': [list(d) for d in dims[0]],
                        'flops': fl, 'ms': 1000 * s,
                        'gflops_per_s': fl / s / 1e9})
  out['step_ms'] = {k: 1000 * median_s(samples[f'step_{k}']) / steps[k]
                    for k in steps}
  out['dots_ms'] = sum(d['ms'] for d in out['dots'])
  return out


# ------------------------------------------------------------------ main

def markdown(meta, rows, analysis, args):
  b = meta['backend']
  strategies = [s for s in engine.STRATEGIES if s != 'auto']
  lines = [f'# Student training: one program vs one after another ({b})', '',
           f'Command: `{meta["command"]}`', '',
           f'Device: {meta["device"]} ({meta["cpu_count"]} cores, shared); '
           f'jax {meta["jax"]}; layers `{meta["layers_impl"]}`; real '
           f'Fashion-MNIST training images ({meta["train_images"]}), '
           f'stand-in targets; batch {BATCH}; {args.steps} steps per '
           f'measurement, median of {args.repeats} interleaved rounds '
           '(`os.getloadavg()` before/after each in the JSON). '
           '"sequential" = one program for one student, run for each '
           f'student in turn. `auto` picks **{meta["auto_strategy"]}** here.',
           '', '## Steps per second (all n students; higher is better)', '',
           'Speedups are the median over rounds of the ratio of the two '
           'times measured in the same round.', '',
           '| n | student | ' + ' | '.join(strategies)
           + ' | sequential | auto vs sequential | best vs sequential |',
           '|---|---|' + '---|' * (len(strategies) + 3)]
  for r in rows:
    sps = [f'{r["steps_per_s"][s]:.2f}' + (' (auto)' if s == r['auto'] else '')
           for s in strategies]
    lines.append(
        f'| {r["n"]} | `{r["student"]}` D{r["width"]} | ' + ' | '.join(sps)
        + f' | {r["steps_per_s"]["sequential"]:.2f} | '
        f'{r["speedup_vs_sequential"][r["auto"]]:.2f}x | '
        f'{r["speedup_vs_sequential"][r["best"]]:.2f}x ({r["best"]}) |')
  lines += ['', 'Targets: n = 8 in one program >= 2x faster than sequential; '
            '`auto` never slower than sequential.', '',
            '## Achieved FLOP/s (FLOPs from XLA cost analysis of the '
            'compiled one-step program)', '',
            f'Reference: jnp float32 {MATMUL}x{MATMUL} matmul, median per '
            'row measured in the same rounds. Target: >= 50%.', '',
            '| n | GFLOP/step (auto) | ' + ' | '.join(
                f'{s} GFLOP/s' for s in strategies)
            + ' | sequential GFLOP/s | matmul GFLOP/s | auto / matmul |'
            ' sequential / matmul |',
            '|---|---|' + '---|' * (len(strategies) + 4)]
  for r in rows:
    a = r['auto']
    lines.append(
        f'| {r["n"]} | {r["flops_per_step"][a] / 1e9:.2f} | '
        + ' | '.join(f'{r["achieved_flops_per_s"][s] / 1e9:.1f}'
                     for s in strategies)
        + f' | {r["achieved_flops_per_s"]["sequential"] / 1e9:.1f} | '
        f'{r["matmul_flops_per_s"] / 1e9:.1f} | '
        f'{100 * r["fraction_of_matmul"][a]:.0f}% | '
        f'{100 * r["fraction_of_matmul"]["sequential"]:.0f}% |')
  lines += ['', '## Compile time (s; jitted epoch lowered and compiled ahead of time)', '',
            '| n | ' + ' | '.join(strategies) + ' | sequential (one program) |',
            '|---|' + '---|' * (len(strategies) + 1)]
  for r in rows:
    lines.append(f'| {r["n"]} | ' + ' | '.join(
        f'{r["compile_s"][s]:.1f}' for s in [*strategies, 'sequential'])
                 + ' |')
  if analysis:
    a = analysis
    lines += ['', f'## Where a student step goes (n = {a["n"]} student, one '
              'member, batch 128)', '',
              'Every matmul (`dot_general`) of the forward + backward pass, '
              'from the jaxpr, timed alone (median of '
              f'{args.repeats}), next to the whole training step.', '',
              '| lhs | rhs | contract | MFLOP | ms | GFLOP/s |',
              '|---|---|---|---|---|---|']
    for d in sorted(a['dots'], key=lambda d: -d['ms']):
      lines.append(f'| {d["lhs"]} | {d["rhs"]} | {d["contract"]} | '
                   f'{d["flops"] / 1e6:.0f} | {d["ms"]:.2f} | '
                   f'{d["gflops_per_s"]:.1f} |')
    lines += ['', f'Matmuls alone: {a["dots_ms"]:.1f} ms; whole step '
              f'(library layers, `{meta["layers_impl"]}`): '
              f'{a["step_ms"]["library"]:.1f} ms; whole step with XLA\'s '
              f'convolution and pooling (`impl=\'xla\'`): '
              f'{a["step_ms"]["xla_conv"]:.1f} ms.']
  return lines


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--ns', default='1,2,4,8')
  ap.add_argument('--analyze', type=int, default=1)
  ap.add_argument('--host-devices', type=int, default=0,
                  help="XLA:CPU devices to show (0 = jax's default, one); "
                  "'sharded' splits the students over them")
  ap.add_argument('--train-size', type=int, default=0,
                  help='use only this many training images (0 = all 48k)')
  args = ap.parse_args()
  backend = jax.default_backend()
  stem = os.path.join(RESULTS, f'bench_students_{backend}')
  ds = tcn_jax.load_dataset('fashion_mnist', train_size=args.train_size)
  x = jnp.asarray(ds.train.x)
  log(f'data: {ds.source}, train {ds.train.x.shape}; backend {backend}')
  key = {k: getattr(args, k) for k in ('steps', 'repeats', 'ns',
                                       'train_size', 'host_devices')}
  partial = stem + '.partial.json'
  rows, analysis = [], None
  if os.path.exists(partial):
    with open(partial) as f:
      saved = json.load(f)
    if saved['args'] == key:
      rows, analysis = saved['rows'], saved.get('analysis')
      log(f'resuming: n = {[r["n"] for r in rows]} already measured')
  done = {r['n'] for r in rows}

  def save():
    os.makedirs(RESULTS, exist_ok=True)
    with open(partial, 'w') as f:
      json.dump({'args': key, 'rows': rows, 'analysis': analysis}, f)

  for n in [int(v) for v in args.ns.split(',')]:
    if n in done:
      continue
    row = bench_n(n, x, args.steps, args.repeats)
    log(json.dumps({k: row[k] for k in ('n', 'steps_per_s',
                                        'speedup_vs_sequential',
                                        'fraction_of_matmul')}))
    rows.append(row)
    save()
  if args.analyze and analysis is None:
    analysis = analyze(x, args.repeats)
    save()
  meta = meta_info(command=command(), steps=args.steps, batch=BATCH,
                   repeats=args.repeats, train_images=len(ds.train.x),
                   data=ds.source, strategies=list(engine.STRATEGIES),
                   tcn_jax=tcn_jax.__file__)
  write_results(stem, {'meta': meta, 'rows': rows, 'analysis': analysis},
                markdown(meta, rows, analysis, args))
  os.remove(partial)


if __name__ == '__main__':
  main()
