"""Benchmark: a student group on a mesh of devices, and over processes.

  python -m experiments.bench_distributed [--steps 5] [--repeats 3] \
      [--devices 2,4]

Two parts, each in fresh subprocesses (XLA_FLAGS and jax.distributed must
be set up before jax starts), with n=4 Fashion-MNIST paper students
(`C32 C32 MP C16 C16 MP Do.25 F D16r Do.3`, 64-d chunks, batch 128, random
28x28 inputs; timings do not depend on the data), one training epoch of
`--steps` steps (compile excluded, median of `--repeats`):

1. Devices (one process, `--devices` XLA:CPU host devices): the strategies
   vmap and unrolled on one device, sharded (shard_map over the devices,
   no mesh), and `engine.make_group_epoch` on a ('data', 'students') mesh:
   students over every device (data=1) and data-parallel (students=1).
   The mesh timings include feeding the epoch's batches from host memory,
   as `fit` does.
2. Processes: 1 process training all 4 students vs 2 jax.distributed CPU
   processes on localhost (Gloo) running one program over the global mesh,
   students split over the processes (data=1, students=2) or data-parallel
   (data=2, students=1). Process 0's time per step.

Writes experiments/results/bench_distributed_<backend>.{md,json}.
"""
import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'experiments', 'results')
SPEC = 'C32 C32 MP C16 C16 MP Do.25 F D16r Do.3'
N, D, BATCH, CLASSES = 4, 256, 128, 10


def _setup():
  """jax, imported only once XLA_FLAGS / the role's environment is set."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax


def _student_group(jax, ids, x):
  """(model, member step, stacked state) of FF students `ids` (no BN)."""
  import optax  # pylint: disable=g-import-not-at-top
  from tcn_jax import engine, losses, models  # pylint: disable=g-import-not-at-top
  model = models.student(SPEC, D // N)
  params = engine.init_group(lambda k: model.init(k, x[:1])['params'], 0, ids)
  tx = optax.adam(1e-3, eps=1e-7)

  def loss_fn(p, xb, tb, key):
    pred = model.apply({'params': p}, xb, train=True, rngs={'dropout': key})
    return losses.mse(pred, tb)

  from tcn_jax.state import MemberState  # pylint: disable=g-import-not-at-top
  state = MemberState(params, jax.vmap(tx.init)(params))
  return model, engine.gradient_step(loss_fn, tx), state


def _time_epochs(jax, epoch_fn, state, x, targets, keys, steps, repeats):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tcn_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  order = input_pipeline.batch_order(0, 0, steps * BATCH, BATCH)
  state, m = epoch_fn(state, x, targets, order, keys, 0)
  jax.block_until_ready(m)
  times = []
  for r in range(repeats):
    t = time.perf_counter()
    state, m = epoch_fn(state, x, targets, order, keys, r + 1)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _data(steps):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.random((steps * BATCH, 28, 28, 1), np.float32)
  targets = rng.standard_normal((N, len(x), D // N)).astype(np.float32)
  return x, targets


def role_devices(args):
  """Part 1, inside a process with --devices host devices."""
  jax = _setup()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tcn_jax import engine, mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  x, targets = _data(args.steps)
  ids = list(range(N))
  keys = engine.member_keys(0, ids)
  d = jax.local_device_count()
  out = {'devices': d}
  layouts = {'vmap': ('vmap', None), 'unrolled': ('unrolled', None),
             'sharded': ('sharded', None),
             'mesh_students': ('auto', mesh_lib.make_mesh(1, d)),
             'mesh_data': ('auto', mesh_lib.make_mesh(d, 1))}
  for name, (strategy, mesh) in layouts.items():
    _, step, state = _student_group(jax, ids, x)
    epoch_fn = engine.make_group_epoch(step, N, strategy, mesh)
    xs, ts = (x, targets) if mesh else (jnp.asarray(x), jnp.asarray(targets))
    out[name] = _time_epochs(jax, epoch_fn, state, xs, ts, keys,
                             args.steps, args.repeats) / args.steps
  print('RESULT ' + json.dumps(out), flush=True)


def role_process(args):
  """Part 2 in one of 1 or 2 processes."""
  jax = _setup()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tcn_jax import distributed, engine, mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  p, k = args.num_processes, args.process_id
  distributed.initialize(p, k, f'localhost:{args.port}')
  x, targets = _data(args.steps)
  ids = list(range(N))
  out = {'processes': jax.process_count(), 'devices': jax.device_count()}
  layouts = {'one': None} if p == 1 else {
      'students': mesh_lib.make_mesh(1, p), 'data': mesh_lib.make_mesh(p, 1)}
  for name, mesh in layouts.items():
    _, step, state = _student_group(jax, ids, x)
    epoch_fn = engine.make_group_epoch(step, N, 'auto', mesh)
    xs, ts = (x, targets) if mesh else (jnp.asarray(x), jnp.asarray(targets))
    out[name] = _time_epochs(jax, epoch_fn, state, xs, ts,
                             engine.member_keys(0, ids), args.steps,
                             args.repeats) / args.steps
  if k == 0:
    print('RESULT ' + json.dumps(out), flush=True)
  distributed.shutdown()


def _run(cmd, env=None, timeout=1800):
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
  if proc.returncode:
    sys.exit(f'failed: {" ".join(cmd)}\n{proc.stderr[-3000:]}')
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _common(args):
  return ['--steps', str(args.steps), '--repeats', str(args.repeats)]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--devices', default='2,4')
  ap.add_argument('--role', default='main')
  ap.add_argument('--num-processes', type=int, default=1)
  ap.add_argument('--process-id', type=int, default=0)
  ap.add_argument('--port', type=int, default=0)
  args = ap.parse_args()
  if args.role == 'devices':
    return role_devices(args)
  if args.role == 'process':
    return role_process(args)

  me = [sys.executable, '-m', 'experiments.bench_distributed']   # cwd=ROOT.
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  devices = {}
  for d in [int(v) for v in args.devices.split(',')]:
    devices[str(d)] = _run(me + ['--role', 'devices'] + _common(args), dict(
        env, XLA_FLAGS=f'--xla_force_host_platform_device_count={d}'))
    print('devices', d, devices[str(d)], flush=True)
  single = _run(me + ['--role', 'process', '--num-processes', '1']
                + _common(args), env)
  print('single', single, flush=True)
  port = _free_port()
  procs = [subprocess.Popen(
      me + ['--role', 'process', '--num-processes', '2', '--process-id',
            str(k), '--port', str(port)] + _common(args), cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for k in range(2)]
  outs = [p.communicate(timeout=1800) for p in procs]
  if any(p.returncode for p in procs):
    sys.exit('2-process run failed:\n' + '\n'.join(e[-3000:]
                                                    for _, e in outs))
  line = [l for l in outs[0][0].splitlines() if l.startswith('RESULT ')][-1]
  multi = json.loads(line[len('RESULT '):])
  print('multi', multi, flush=True)
  import jax  # pylint: disable=g-import-not-at-top
  write(args, devices, single, multi, jax.__version__)


def write(args, devices, single, multi, jax_version):
  command = ('python -m experiments.bench_distributed --steps '
             f'{args.steps} --repeats {args.repeats} --devices {args.devices}')
  info = {'command': command, 'machine': platform.processor() or
          platform.machine(), 'cpus': os.cpu_count(),
          'loadavg_end': os.getloadavg(), 'jax': jax_version,
          'student': SPEC, 'num_students': N, 'batch': BATCH,
          'devices': devices, 'single_process': single,
          'two_processes': multi}
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, 'bench_distributed_cpu.json'), 'w') as f:
    json.dump(info, f, indent=1)
  ms = lambda s: f'{1000 * s:.1f}'
  lines = [
      '# A student group on a mesh of devices and over processes (cpu)', '',
      f'Command: `{command}`', '',
      f'{info["cpus"]} CPU cores (shared with other jobs; load average at '
      f'the end {info["loadavg_end"][0]:.1f}); jax {jax_version}; n={N} '
      f'students `{SPEC}`, batch {BATCH}; compile excluded; medians. Host '
      '"devices" and local processes share the same cores: these numbers '
      'show what the machinery costs, not a speed-up.', '',
      '## One process, several XLA:CPU devices (ms per training step, all '
      f'{N} students)', '',
      '| host devices | vmap (1 device) | unrolled (1 device) | sharded '
      '(shard_map) | mesh, students over devices | mesh, data-parallel |',
      '|---|---|---|---|---|---|']
  for d, r in devices.items():
    lines.append(f'| {d} | {ms(r["vmap"])} | {ms(r["unrolled"])} | '
                 f'{ms(r["sharded"])} | {ms(r["mesh_students"])} | '
                 f'{ms(r["mesh_data"])} |')
  lines += [
      '', '## Processes (ms per step, process 0, all 4 students)', '',
      '| layout | ms/step |', '|---|---|',
      f'| 1 process, 1 device | {ms(single["one"])} |',
      f'| 2 processes, mesh data=1 students=2 | {ms(multi["students"])} |',
      f'| 2 processes, mesh data=2 students=1 | {ms(multi["data"])} |']
  with open(os.path.join(RESULTS, 'bench_distributed_cpu.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
