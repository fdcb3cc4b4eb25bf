"""Benchmark: the Grain streaming input (`tcn_jax.input_pipeline`) on this CPU.

1. Image folders of JPEGs made from Fashion-MNIST (each image upscaled to
   64 x 64 RGB, shifted a little so that copies differ), in the
   image_folder layout (train/<class>/*.jpg, test/<class>/*.jpg), under
   --root (not committed). --sizes names the train sizes.
2. Peak resident memory (ru_maxrss of a fresh process) of one student
   epoch for each size: streamed (images decoded while training, cached
   teacher features as a memory-mapped .npy) beside the in-memory path
   (the folder decoded into arrays, then the same epoch).
3. Input throughput: images/s decoded and augmented (random-resized crop +
   flip to 32 x 32) by Stream.batches with reader threads and with worker
   processes, beside the images/s the students' training steps consume.
4. Fashion-MNIST students (the paper's n = 4, batch 128): step time of the
   streamed path (the training arrays read through Grain, in chunks of
   batches through the same loop and program) beside the in-memory path
   (one chunk per epoch), interleaved.

Writes experiments/results/streaming_cpu.{md,json} with os.getloadavg()
before and after each measurement (the machine is shared; run it under
`flock /work/bench.lock`).

  flock /work/bench.lock python -m experiments.bench_streaming --sizes 10000,100000
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from experiments import common

FMNIST = '/usr/share/datasets/fashion-mnist'
STUDENT = 'C16 MP C32 MP F D32r'   # For 32 x 32 grey images.
FEATURE_DIM, N_STUDENTS, BATCH = 256, 2, 128


def make_folder(root, n_train, n_test=1000, size=64):
  """Writes the folder (skipped when its marker says it is complete)."""
  marker = os.path.join(root, f'done_{n_train}')
  if os.path.exists(marker):
    return
  from PIL import Image
  from tcn_jax import data as data_lib
  x = data_lib.load_idx(FMNIST, 'train')
  rng = np.random.default_rng(0)
  for split, n in (('train', n_train), ('test', n_test)):
    for c in range(10):
      os.makedirs(os.path.join(root, split, f'class{c}'), exist_ok=True)
    for i in range(n):
      j = (i if split == 'train' else 59999 - i) % len(x.x)
      img = Image.fromarray(x.x[j, :, :, 0]).resize((size, size),
                                                    Image.BILINEAR)
      dx, dy = rng.integers(-3, 4, 2)
      img = img.transform(img.size, Image.AFFINE, (1, 0, dx, 0, 1, dy))
      img.convert('RGB').save(os.path.join(
          root, split, f'class{x.y[j]}', f'{i:06d}.jpg'), quality=90)
  open(marker, 'w').close()


def _load(loadavg=None):
  return list(os.getloadavg())


def memory_child(root, mode, workers):
  """One student epoch in this (fresh) process; prints JSON with ru_maxrss."""
  import jax
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from tcn_jax import input_pipeline
  from tcn_jax import students
  cfg = common.get_config('image_folder')
  cfg.data.update(dict(dir=root, image_size=32, channels=1,
                       streaming='always' if mode == 'stream' else 'never',
                       workers=workers, val_fraction=0.01))
  t = time.time()
  ds = input_pipeline.load(cfg.data)
  load_s = time.time() - t
  n = len(ds.train)
  path = os.path.join(root, f'features_{n}.npy')
  if not os.path.exists(path):   # Random "teacher features", on disk.
    out = np.lib.format.open_memmap(path + '.tmp.npy', 'w+', np.float32,
                                    (n, FEATURE_DIM))
    for a in range(0, n, 10000):
      out[a:a + 10000] = np.random.default_rng(a).random(
          (min(10000, n - a), FEATURE_DIM), np.float32)
    out.flush()
    del out
    os.replace(path + '.tmp.npy', path)
  feats = np.load(path, mmap_mode='r')
  if mode == 'memory':
    feats = np.array(feats)   # The in-memory path holds them.
  k = min(64, len(ds.val))
  val_x = ds.val.x[:k] if mode == 'memory' else ds.val.x.subset(range(k))
  val_f = np.random.default_rng(1).random((k, FEATURE_DIM), np.float32)
  t = time.time()
  _, info = students.train_students(STUDENT, ds.train.x, feats, N_STUDENTS,
                                    epochs=1, batch_size=BATCH,
                                    val=(val_x, val_f))
  epoch_s = time.time() - t
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  print(json.dumps({'mode': mode, 'n_train': n, 'peak_rss_mb': rss,
                    'peak_rss_children_mb': kids, 'load_s': load_s,
                    'epoch_s': epoch_s, 'backend': jax.default_backend()}))


def memory(root, mode, workers):
  before = _load()
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.bench_streaming', '--child', root,
       '--child-mode', mode, '--workers', str(workers)],
      cwd=common.REPO, capture_output=True, text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
  if out.returncode or not lines:
    raise RuntimeError(out.stderr[-3000:])
  rec = json.loads(lines[-1])
  rec['loadavg'] = {'before': before, 'after': _load()}
  return rec


def throughput(root, workers_list, batches):
  """Images/s of decode + random-resized crop + flip, per worker count."""
  from tcn_jax import input_pipeline as ip
  src = ip.ImageFolderSource(os.path.join(root, 'train'))
  out = []
  for workers in workers_list:
    stream = ip.Stream(src, ip.Transform(32, 1, crop=True, flip=True),
                       workers=workers, threads=2, prefetch=4)
    before = _load()
    it = stream.batches(0, 0, BATCH)
    next(it)   # Worker start-up is not throughput.
    t = time.time()
    for _ in range(batches):
      next(it)
    dt = time.time() - t
    out.append({'workers': workers, 'threads': 2,
                'images_per_s': batches * BATCH / dt,
                'loadavg': {'before': before, 'after': _load()}})
    del it
  return out


def consumption(steps):
  """Images/s that the students' training step consumes (32 x 32 grey,
  2 students, batch 128, on device arrays: no input cost)."""
  import jax
  import jax.numpy as jnp
  from tcn_jax import engine, input_pipeline, losses, optim
  from tcn_jax import assemble
  groups = assemble.group_students([STUDENT] * N_STUDENTS,
                                   [FEATURE_DIM // N_STUDENTS] * N_STUDENTS,
                                   False, 'normal')
  group = groups[0]
  model = group.model('auto')
  x = jnp.asarray(np.random.default_rng(0).random((BATCH, 32, 32, 1),
                                                  np.float32))
  tb = {'chunk': jnp.zeros((N_STUDENTS, BATCH, FEATURE_DIM // N_STUDENTS))}
  loss = losses.STUDENT_LOSSES.get('mse')(group.out_dim)
  tx = optim.make_optimizer('adam', 1e-3, 'x')
  params = engine.init_group(lambda k: model.init(k, x[:1]), 0,
                             group.member_ids)['params']

  def loss_fn(p, xb, t, key):
    return loss(model.apply({'params': p}, xb, train=True,
                            rngs={'dropout': key}), t)
  from tcn_jax.state import MemberState
  state = MemberState(params, jax.vmap(tx.init)(params))
  trainer = engine.Trainer(engine.gradient_step(loss_fn, tx), N_STUDENTS,
                           'auto')
  chunk = lambda state, xs, ts, keys, epoch, offset, context: trainer(
      state, engine.Fed(xs, ts), keys, epoch, offset, context)
  xs = np.asarray(x)[None]
  ts = {k: np.asarray(v)[None] for k, v in tb.items()}
  keys = engine.member_keys(0, group.member_ids)
  state, m = chunk(state, xs, ts, keys, 0, 0, None)
  jax.block_until_ready(m)
  before = _load()
  t = time.time()
  for i in range(steps):
    state, m = chunk(state, xs, ts, keys, 0, i, None)
  jax.block_until_ready(m)
  dt = time.time() - t
  return {'images_per_s': steps * BATCH / dt, 'step_ms': 1000 * dt / steps,
          'loadavg': {'before': before, 'after': _load()}}


def fmnist_steps(train_size, repeats):
  """Per-step ms of 4 paper students on Fashion-MNIST, in memory vs
  streamed (interleaved rounds; each round's second epoch, after the first
  compiled)."""
  from tcn_jax import data as data_lib
  from tcn_jax import input_pipeline as ip
  from tcn_jax import students
  split = data_lib.load_idx(FMNIST, 'train')
  x = split.x[:train_size].astype(np.float32) / 255.0
  feats = np.random.default_rng(0).random((train_size, 256), np.float32)
  arch = common.get_config('fashion_mnist').students.arch_by_n['4']
  stream = ip.Stream(ip.ArraySource(x, split.y[:train_size]))
  rows = {'memory': [], 'stream': []}
  steps = train_size // 128
  for _ in range(repeats):
    for name, inputs in (('memory', x), ('stream', stream)):
      before = _load()
      _, info = students.train_students(arch, inputs, feats, 4, epochs=2,
                                        batch_size=128,
                                        val=(x[:10], feats[:10]))
      h = info['history'][0]   # Epoch 2 alone: no compilation in it.
      rows[name].append({'step_ms': 1000 * (h[1]['seconds'] - h[0]['seconds'])
                                    / steps,
                         'loadavg': {'before': before, 'after': _load()}})
  med = {k: float(np.median([v['step_ms'] for v in vs]))
         for k, vs in rows.items()}
  ratios = [s['step_ms'] / m['step_ms'] for m, s in zip(rows['memory'],
                                                          rows['stream'])]
  return {'train_size': train_size, 'steps_per_epoch': steps,
          'rounds': rows, 'median_step_ms': med,
          'stream_over_memory_median': float(np.median(ratios))}


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--root', default='/tmp/tcn_stream_bench')
  p.add_argument('--sizes', default='10000,100000')
  p.add_argument('--workers', type=int, default=0)
  p.add_argument('--throughput-workers', default='0,2')
  p.add_argument('--throughput-batches', type=int, default=40)
  p.add_argument('--consume-steps', type=int, default=30)
  p.add_argument('--fmnist-train-size', type=int, default=12800)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--child', default='')
  p.add_argument('--child-mode', default='stream')
  p.add_argument('--skip-memory-path-above', type=int, default=10**9)
  p.add_argument('--remeasure-stream-memory', action='store_true',
                 help='only measure the streamed epochs again, replacing '
                 'them in the existing streaming_cpu.json (the earlier '
                 'records are kept under memory_earlier)')
  p.add_argument('--records', default='',
                 help='with --remeasure-stream-memory: the --child outputs')
  p.add_argument('--only', default='', choices=('', 'step'),
                 help='step: only measure the Fashion-MNIST step times '
                 'again, replacing them in the existing streaming_cpu.json '
                 '(the earlier ones are kept under fmnist_earlier)')
  args = p.parse_args()
  from absl import flags   # Grain's worker processes read absl flags.
  flags.FLAGS.mark_as_parsed()
  if args.child:
    return memory_child(args.child, args.child_mode, args.workers)
  if args.only == 'step':
    with open(os.path.join(common.RESULTS, 'streaming_cpu.json')) as f:
      out = json.load(f)
    out.setdefault('fmnist_earlier', out['fmnist'])
    before = _load()
    out['fmnist'] = fmnist_steps(args.fmnist_train_size, args.repeats)
    out['fmnist']['command'] = common.command()
    out['fmnist']['loadavg_start'], out['fmnist']['loadavg_end'] = (
        before, _load())
    print(out['fmnist'], flush=True)
    return write(out)
  sizes = [int(s) for s in args.sizes.split(',')]
  if args.remeasure_stream_memory:
    with open(os.path.join(common.RESULTS, 'streaming_cpu.json')) as f:
      out = json.load(f)
    if args.records:   # Child records measured already (one JSON a line).
      with open(args.records) as f:
        again = [json.loads(l) for l in f if l.startswith('{')]
    else:
      again = [memory(os.path.join(args.root, str(n)), 'stream',
                      args.workers) for n in sizes]
    print(again, flush=True)
    out['memory_earlier'] = [r for r in out['memory'] if r['mode'] == 'stream']
    out['memory'] = again + [r for r in out['memory'] if r['mode'] != 'stream']
    out['remeasure_command'] = common.command()
    return write(out)
  out = {'command': common.command(), 'sizes': sizes,
         'loadavg_start': _load(), 'cpus': os.cpu_count()}
  gen = {}
  for n in sizes:
    t = time.time()
    make_folder(os.path.join(args.root, str(n)), n)
    gen[n] = time.time() - t
    print(f'folder {n}: {gen[n]:.0f} s', flush=True)
  out['generate_s'] = gen
  out['memory'] = []
  for n in sizes:
    for mode in ('stream', 'memory'):
      if mode == 'memory' and n > args.skip_memory_path_above:
        continue
      rec = memory(os.path.join(args.root, str(n)), mode, args.workers)
      print(rec, flush=True)
      out['memory'].append(rec)
  out['throughput'] = throughput(os.path.join(args.root, str(sizes[0])),
                                 [int(w) for w in
                                  args.throughput_workers.split(',')],
                                 args.throughput_batches)
  print(out['throughput'], flush=True)
  out['consumption'] = consumption(args.consume_steps)
  print(out['consumption'], flush=True)
  out['fmnist'] = fmnist_steps(args.fmnist_train_size, args.repeats)
  print(out['fmnist'], flush=True)
  out['loadavg_end'] = _load()
  write(out)


def write(out):
  os.makedirs(common.RESULTS, exist_ok=True)
  base = os.path.join(common.RESULTS, 'streaming_cpu')
  with open(base + '.json', 'w') as f:
    json.dump(out, f, indent=2)
  mem = {(r['mode'], r['n_train']): r for r in out['memory']}
  sizes = sorted({r['n_train'] for r in out['memory']})
  lines = ['# Streaming input on the CPU (Grain)', '',
           f"Command: `flock /work/bench.lock {out['command']}`; "
           f"{out['cpus']} CPUs, load average at start "
           f"{out['loadavg_start'][0]:.1f}, at end "
           f"{out['loadavg_end'][0]:.1f} (shared machine).", '',
           '## Peak resident memory of one student epoch', '',
           f'{N_STUDENTS} students `{STUDENT}` on 32 x 32 grey crops of 64 x '
           '64 JPEGs, batch 128, features 256-d. Streamed: images decoded '
           'while training, features a memory-mapped .npy; in memory: the '
           'folder decoded into arrays first, features held. Epoch seconds '
           'include compilation.', '',
           '| train images | streamed peak RSS (MB) | epoch s | in memory '
           'peak RSS (MB) | epoch s |', '|---|---|---|---|---|']
  for n in sizes:
    s, m = mem.get(('stream', n)), mem.get(('memory', n))
    lines.append(f"| {n:,} | {s['peak_rss_mb']:.0f} | {s['epoch_s']:.0f} | "
                 + (f"{m['peak_rss_mb']:.0f} | {m['epoch_s']:.0f} |" if m
                    else 'not run | |'))
  if len(sizes) > 1:
    a, b = mem[('stream', sizes[0])], mem[('stream', sizes[-1])]
    lines += ['', f"Streamed: {sizes[-1]:,} images use "
              f"{b['peak_rss_mb'] / a['peak_rss_mb']:.3f}x the peak memory "
              f"of {sizes[0]:,} (target: within 1.15x)."]
    m0, m1 = mem.get(('memory', sizes[0])), mem.get(('memory', sizes[-1]))
    if m0 and m1:
      lines.append(f"In memory: {m1['peak_rss_mb'] / m0['peak_rss_mb']:.3f}x.")
  if out.get('memory_earlier'):
    lines += ['', 'The streamed rows were measured again (`'
              + out['remeasure_command'] + '`) after memory-mapped feature '
              'pages were released while reading and the file list made '
              'compact; the first measurement: ' + ', '.join(
                  f"{r['n_train']:,} images {r['peak_rss_mb']:.0f} MB"
                  for r in out['memory_earlier']) + '.']
  c = out['consumption']
  lines += ['', '## Input throughput vs what the students consume', '',
            '| input | images/s | / students |', '|---|---|---|']
  for t in out['throughput']:
    lines.append(f"| decode + random-resized crop + flip, {t['workers']} "
                 f"worker processes, {t['threads']} reader threads | "
                 f"{t['images_per_s']:.0f} | "
                 f"{t['images_per_s'] / c['images_per_s']:.2f}x |")
  lines.append(f"| students' training steps ({N_STUDENTS} students, batch "
               f"{BATCH}, {c['step_ms']:.1f} ms/step) | "
               f"{c['images_per_s']:.0f} | 1 |")
  f = out['fmnist']
  lines += ['', '## Fashion-MNIST: streamed vs in-memory step time', '',
            f"4 paper students (n = 4), batch 128, {f['train_size']:,} "
            f"training images ({f['steps_per_epoch']} steps), "
            f"{len(f['rounds']['memory'])} interleaved rounds, each timing "
            'the second epoch (the first compiles).', '',
            f"In memory {f['median_step_ms']['memory']:.1f} ms/step, "
            f"streamed {f['median_step_ms']['stream']:.1f} ms/step: "
            f"**{f['stream_over_memory_median']:.3f}x** (median of the "
            'per-round ratios; target within 1.1x). Per round (memory / '
            'streamed ms, load average before the round): ' + '; '.join(
                f"{m['step_ms']:.0f} / {t['step_ms']:.0f} "
                f"({m['loadavg']['before'][0]:.1f})"
                for m, t in zip(f['rounds']['memory'], f['rounds']['stream']))
            + '.']
  if out.get('fmnist_earlier'):
    e = out['fmnist_earlier']
    lines += ['', f"Measured again with `flock /work/bench.lock "
              f"{f['command']}` (load average {f['loadavg_start'][0]:.1f} "
              f"at start, {f['loadavg_end'][0]:.1f} at end) after the "
              'streamed path ran chunks of batches through one compiled '
              'scan (the in-memory epoch\'s body) instead of one compiled '
              'step per batch; the memory and throughput rows above are '
              'from the first run (`' + out['command'] + '`). The first '
              f"run's step times: in memory "
              f"{e['median_step_ms']['memory']:.1f} ms, streamed "
              f"{e['median_step_ms']['stream']:.1f} ms, "
              f"{e['stream_over_memory_median']:.3f}x."]
  with open(base + '.md', 'w') as fh:
    fh.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
