"""Same config and seed, before and after a refactor: runs the evidence set
of configurations through the command line of the tree it is run from and
writes each run's results.json metrics and parameter digests to one JSON, so
two trees (two commits) can be compared on the same machine.

  python -m experiments.behaviour_check --root /tmp/check_new --out new.json
  python -m experiments.behaviour_check --compare old.json new.json

Runs: `:smoke`, `:gan,smoke`, `:smoke` with PCA chunks, `:tuned,smoke` with
KD and KDGAN, a streamed image-folder smoke with step checkpoints, a
4-forced-device run on a 2x2 mesh and a 2-process localhost run. Digests are
bitwise only on the same CPU type.
"""
import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = os.path.join(ROOT, 'configs', 'fashion_mnist.py')
FOLDER = os.path.join(ROOT, 'configs', 'image_folder.py')
# A mesh run small enough for 2 cores: the tiny pipeline of the tests.
TINY = ['--config.num_students=2', '--config.data.train_size=300',
        '--config.data.test_size=200', '--config.teacher.epochs=2',
        '--config.teacher.body=C8 MP F D64r D32r', '--config.students.epochs=2',
        '--config.students.arch=C4 MP F D8r', '--config.head.epochs=2']
RUNS = {
    'smoke': [f'--config={FMNIST}:smoke'],
    'gan_smoke': [f'--config={FMNIST}:gan,smoke'],
    'smoke_pca': [f'--config={FMNIST}:smoke', '--config.chunking=pca'],
    'tuned_smoke_kd_kdgan': [f'--config={FMNIST}:tuned,smoke',
                             '--config.kd.enabled=True',
                             '--config.kdgan.enabled=True'],
    'folder_streamed_steps': [
        f'--config={FOLDER}:smoke', '--config.data.streaming=always',
        '--config.data.val_fraction=0.1',
        '--config.data.checkpoint_every_steps=3', '--config.num_students=2',
        '--config.teacher.body=C4 MP F D16r', '--config.teacher.epochs=2',
        '--config.teacher.batch_size=4', '--config.students.batch_size=4',
        '--config.students.arch=C4 MP F D8r', '--config.students.epochs=2',
        '--config.head.epochs=1'],
    'mesh_2x2': [f'--config={FMNIST}:smoke', *TINY, '--config.mesh.data=2',
                 '--config.mesh.students=2'],
    'two_processes': [f'--config={FMNIST}:smoke', *TINY],
}
KEYS = ('teacher_test_acc', 'tcn_test_acc_before_finetune',
        'tcn_test_acc_after_finetune', 'student_val_mse', 'kd', 'kdgan',
        'digests')


def image_folder(root):
  """train/ (3 classes x 14) and val/ (3 x 3) of random 12x12 PNGs."""
  from PIL import Image   # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, n in (('train', 14), ('val', 3)):
    for c in range(3):
      os.makedirs(os.path.join(root, split, f'class{c}'), exist_ok=True)
      for i in range(n):
        Image.fromarray((rng.random((12, 12, 3)) * 255).astype(
            np.uint8)).save(os.path.join(root, split, f'class{c}', f'{i}.png'))


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(name, flags, workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  main = [sys.executable, '-m', 'tcn_jax.main', f'--workdir={workdir}']
  if name == 'mesh_2x2':
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
  if name != 'two_processes':
    subprocess.run(main + flags, cwd=ROOT, env=env, check=True)
    return
  port = free_port()
  procs = [subprocess.Popen(
      main + flags + ['--config.distributed.num_processes=2',
                      f'--config.distributed.process_id={k}',
                      f'--config.distributed.coordinator=localhost:{port}'],
      cwd=ROOT, env=env) for k in range(2)]
  for p in procs:
    if p.wait() != 0:
      raise SystemExit(f'{name}: a process exited {p.returncode}')


def run_all(root, only):
  out = {}
  for name in only or RUNS:   # In the order asked.
    flags = RUNS[name]
    if name == 'folder_streamed_steps':
      images = os.path.join(root, 'images')
      image_folder(images)
      flags = flags + [f'--config.data.dir={images}']
    workdir = os.path.join(root, name)
    launch(name, flags, workdir)
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
    out[name] = {k: results[k] for k in KEYS if k in results}
  return out


def _drop_seconds(tree):
  """`tree` without its timings (keys naming seconds)."""
  if isinstance(tree, dict):
    return {k: _drop_seconds(v) for k, v in tree.items() if 'seconds' not in k}
  return tree


def compare(a, b):
  a, b = _drop_seconds(a), _drop_seconds(b)
  same = True
  for name in sorted(set(a) | set(b)):
    eq = a.get(name) == b.get(name)
    same &= eq
    print(f'{name}: {"identical" if eq else "DIFFERENT"}')
    if not eq:
      for k in sorted(set(a.get(name, {})) | set(b.get(name, {}))):
        if a.get(name, {}).get(k) != b.get(name, {}).get(k):
          print(f'  {k}: {a.get(name, {}).get(k)} vs {b.get(name, {}).get(k)}')
  return same


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--root')
  ap.add_argument('--out')
  ap.add_argument('--only', nargs='*')
  ap.add_argument('--compare', nargs=2)
  args = ap.parse_args()
  if args.compare:
    a, b = (json.load(open(p)) for p in args.compare)
    sys.exit(0 if compare(a, b) else 1)
  results = run_all(args.root, args.only)
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)


if __name__ == '__main__':
  main()
