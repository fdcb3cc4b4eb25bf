"""Benchmark: students across devices ('sharded') and across processes.

  python -m experiments.bench_distributed [--steps 5] [--repeats 3] \
      [--devices 2,4] [--batches 1,128,1000] [--calls 30]

Three parts, each in fresh subprocesses (XLA_FLAGS and jax.distributed must
be set up before jax starts), with n=4 Fashion-MNIST paper students
(`C32 C32 MP C16 C16 MP Do.25 F D16r Do.3`, 64-d chunks, batch 128, random
28x28 inputs; timings do not depend on the data):

1. Devices: one training epoch of `--steps` steps (compile excluded, median
   of `--repeats`) with the strategies vmap, unrolled, sharded (shard_map,
   the engine's) and the same vmap program partitioned by GSPMD (jit with
   NamedSharding in/out shardings), on `--devices` XLA:CPU host devices
   (--xla_force_host_platform_device_count).
2. Processes, training: 2 jax.distributed CPU processes on localhost, each
   training its 2 students (auto strategy), vs 1 process training all 4.
   Wall per epoch = the slower process.
3. Processes, inference: `distributed.make_predict` (each process runs its
   students, chunk outputs gathered with process_allgather, head everywhere)
   vs single-process `assemble.make_predict`, per batch size: median
   round-trip latency over `--calls` calls, compile excluded; also the
   allgather alone.
Parts 2 and 3 run twice: with the courier transport (the default: a child
process per process is the jax.distributed member) and with jax.distributed
joined in the process itself (courier=False).

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

  state = {'params': params, 'opt_state': jax.vmap(tx.init)(params)}
  return model, engine.gradient_step(loss_fn, tx), state


def _time_epochs(jax, epoch_fn, state, x, targets, keys, steps, repeats):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tcn_jax import engine  # pylint: disable=g-import-not-at-top
  order = engine.batch_order(0, 0, steps * BATCH, BATCH)
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
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from tcn_jax import engine  # pylint: disable=g-import-not-at-top
  x, targets = _data(args.steps)
  x, targets = jnp.asarray(x), jnp.asarray(targets)
  ids = list(range(N))
  keys = engine.member_keys(0, ids)
  out = {'devices': jax.local_device_count()}
  for name in ('vmap', 'unrolled', 'sharded', 'gspmd'):
    _, step, state = _student_group(jax, ids, x)
    if name == 'gspmd':
      mesh, _ = engine.member_mesh(N)
      mem = NamedSharding(mesh, P(engine.MEMBER_AXIS))
      rep = NamedSharding(mesh, P())
      fn = jax.jit(engine.epoch_body(step, N, 'vmap'),
                   in_shardings=(mem, rep, mem, rep, mem, rep),
                   out_shardings=(mem, NamedSharding(
                       mesh, P(None, engine.MEMBER_AXIS))),
                   donate_argnums=(0,))
      state = jax.device_put(state, mem)
      xs, ts, ks = (jax.device_put(x, rep), jax.device_put(targets, mem),
                    jax.device_put(keys, mem))
      epoch_fn = lambda s, _x, _t, o, _k, e, fn=fn, xs=xs, ts=ts, ks=ks: fn(
          s, xs, ts, o, ks, e)
    else:
      epoch_fn = engine.make_group_epoch(step, N, name)
    out[name] = _time_epochs(jax, epoch_fn, state, x, targets, keys,
                             args.steps, args.repeats) / args.steps
  print('RESULT ' + json.dumps(out), flush=True)


def _tcn(jax, x):
  from tcn_jax import assemble, engine, models  # pylint: disable=g-import-not-at-top
  groups = assemble.group_students([SPEC] * N, [D // N] * N)
  for g in groups:
    m = g.model()
    g.variables = engine.init_group(lambda k, m=m: m.init(k, x[:1]), 0,
                                    g.member_ids)
  head = models.Head(CLASSES, 0.5)
  import numpy as np  # pylint: disable=g-import-not-at-top
  return assemble.TCN(groups=groups, num_classes=CLASSES, head_dropout=0.5,
                      head_variables=head.init(jax.random.key(1),
                                               np.zeros((1, D), np.float32)))


def _latencies(jax, predict, batches, calls):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  out = {}
  for b in batches:
    xb = rng.random((b, 28, 28, 1), np.float32)
    np.asarray(predict(xb))   # Compile.
    times = []
    for _ in range(calls):
      t = time.perf_counter()
      np.asarray(predict(xb))
      times.append(time.perf_counter() - t)
    out[str(b)] = float(np.median(times))
  return out


def role_process(args):
  """Parts 2 and 3 in one of 1 or 2 processes."""
  jax = _setup()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tcn_jax import assemble, distributed, engine  # pylint: disable=g-import-not-at-top
  p, k = args.num_processes, args.process_id
  distributed.initialize(p, k, f'localhost:{args.port}',
                         courier=args.transport == 'courier')
  x, targets = _data(args.steps)
  ids = distributed.share(N, k, p)
  _, step, state = _student_group(jax, ids, x)
  epoch_fn = engine.make_group_epoch(step, len(ids), 'auto')
  train_s = _time_epochs(jax, epoch_fn, state, jnp.asarray(x),
                         jnp.asarray(targets[ids]), engine.member_keys(0, ids),
                         args.steps, args.repeats) / args.steps
  tcn = _tcn(jax, x)
  batches = [int(b) for b in args.batches.split(',')]
  if p == 1:
    predict = assemble.make_predict(tcn)
  else:
    predict = distributed.make_predict(tcn)
  lat = _latencies(jax, predict, batches, args.calls)
  # The transport alone: allgather of a (batch, 128) float32 block.
  gather = {}
  for b in batches:
    blob = np.zeros((b, 128), np.float32).tobytes()
    gather[str(b)] = _latencies(
        jax, lambda x, blob=blob: distributed.allgather_bytes(blob, fast=True),
        [1], args.calls)['1'] if p > 1 else 0.0
  # Every process's numbers, gathered (also a check that gathering works).
  mine = {'train_step_s': train_s, 'latency_s': lat, 'allgather_s': gather,
          'members': ids, 'jax_process_count': jax.process_count()}
  everyone = distributed.allgather_tree(mine)
  if k == 0:
    print('RESULT ' + json.dumps(everyone), flush=True)
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
  return ['--steps', str(args.steps), '--repeats', str(args.repeats),
          '--batches', args.batches, '--calls', str(args.calls)]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--devices', default='2,4')
  ap.add_argument('--batches', default='1,128,1000')
  ap.add_argument('--calls', type=int, default=30)
  ap.add_argument('--role', default='main')
  ap.add_argument('--num-processes', type=int, default=1)
  ap.add_argument('--process-id', type=int, default=0)
  ap.add_argument('--port', type=int, default=0)
  ap.add_argument('--transport', default='courier')
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
                + _common(args), env)[0]
  print('single', single, flush=True)
  multi = {}
  for transport in ('courier', 'jax'):
    port = _free_port()
    procs = [subprocess.Popen(
        me + ['--role', 'process', '--num-processes', '2', '--process-id',
              str(k), '--port', str(port), '--transport', transport]
        + _common(args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate(timeout=1800) for p in procs]
    if any(p.returncode for p in procs):
      sys.exit('2-process run failed:\n' + '\n'.join(e[-3000:]
                                                      for _, e in outs))
    line = [l for l in outs[0][0].splitlines()
            if l.startswith('RESULT ')][-1]
    multi[transport] = json.loads(line[len('RESULT '):])
    print('multi', transport, multi[transport], flush=True)
  import jax  # pylint: disable=g-import-not-at-top
  write(args, devices, single, multi, jax.__version__)


def write(args, devices, single, multi, jax_version):
  command = ('python -m experiments.bench_distributed --steps '
             f'{args.steps} --repeats {args.repeats} --devices {args.devices}'
             f' --batches {args.batches} --calls {args.calls}')
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
      '# Students across devices and processes (cpu)', '',
      f'Command: `{command}`', '',
      f'{info["cpus"]} CPU cores (shared with other jobs; load average at '
      f'the end {info["loadavg_end"][0]:.1f}); jax {jax_version}; n={N} '
      f'students `{SPEC}`, batch {BATCH}; compile excluded; medians.', '',
      '## One process, several XLA:CPU devices (ms per training step, all '
      f'{N} students)', '',
      '| host devices | vmap | unrolled | sharded (shard_map) | GSPMD jit |',
      '|---|---|---|---|---|']
  for d, r in devices.items():
    lines.append(f'| {d} | {ms(r["vmap"])} | {ms(r["unrolled"])} | '
                 f'{ms(r["sharded"])} | {ms(r["gspmd"])} |')
  lines += [
      '', '## Processes: training (ms per step; 2 processes: the slower one)',
      '', '| layout | students per process | ms/step |', '|---|---|---|',
      f'| 1 process | {N} | {ms(single["train_step_s"])} |']
  for transport, rows in multi.items():
    lines.append(
        f'| 2 processes ({transport}) | '
        f'{", ".join(str(len(r["members"])) for r in rows)} | '
        f'{ms(max(r["train_step_s"] for r in rows))} |')
  lines += [
      '', '## Processes: inference round trip (ms per call, process 0)', '',
      'predict(images) -> logits of all 4 students + head; 2 processes: each '
      'runs its 2 students, chunk outputs gathered, head in both. '
      '"allgather" is the transport alone: (batch, 128) float32 per process.',
      '', '| batch | 1 process | 2 processes, courier | allgather, courier |'
      ' 2 processes, jax in-process | allgather, in-process |',
      '|---|---|---|---|---|---|']
  for b, t in single['latency_s'].items():
    c, j = multi['courier'][0], multi['jax'][0]
    lines.append(f'| {b} | {ms(t)} | {ms(c["latency_s"][b])} | '
                 f'{ms(c["allgather_s"][b])} | {ms(j["latency_s"][b])} | '
                 f'{ms(j["allgather_s"][b])} |')
  with open(os.path.join(RESULTS, 'bench_distributed_cpu.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
