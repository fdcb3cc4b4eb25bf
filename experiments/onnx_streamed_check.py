"""An ONNX ResNet-18 teacher streamed over a generated image folder: peak
memory at three folder sizes, and a run SIGKILLed in the features stage then
resumed equals an uninterrupted one bitwise.

  python -m experiments.onnx_streamed_check [--sizes 20,80,320]

The teacher is tests/fixtures/onnx/resnet18_w8.onnx (random weights, so
accuracies mean nothing: teacher.allow_chance). Each run is its own
process; its peak RSS is its own `ru_maxrss`. Writes
experiments/results/onnx_streamed_cpu.json.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from experiments import common

RESNET = os.path.join(common.REPO, 'tests', 'fixtures', 'onnx',
                      'resnet18_w8.onnx')
CHILD = r'''
import json, resource, sys
sys.path.insert(0, {configs!r})
import image_folder
from tcn_jax import pipeline
c = image_folder.get_config('smoke')
c.data.update(dir={root!r}, image_size=64, streaming='always')
c.teacher.init_from = {resnet!r}
c.teacher.allow_chance = True
c.eval_batch_size = 25
c.students.epochs = c.head.epochs = 1
r = pipeline.run(c, {workdir!r})
print('RESULT', json.dumps({{'digests': r['digests'],
    'teacher_test_acc': r['teacher_test_acc'],
    'maxrss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    'wall': r['wall_seconds_this_run']}}))
'''


def make_folder(root, per_class, classes=10, size=64):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, n in (('train', per_class), ('val', max(1, per_class // 4))):
    for c in range(classes):
      d = os.path.join(root, split, f'class{c}')
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(
            np.uint8)).save(os.path.join(d, f'{i}.png'))


def child(root, workdir):
  code = CHILD.format(configs=os.path.join(common.REPO, 'configs'),
                      root=root, resnet=RESNET, workdir=workdir)
  return subprocess.Popen([sys.executable, '-c', code], cwd=common.REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)


def result(proc):
  out, _ = proc.communicate()
  for line in out.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[7:])
  raise RuntimeError(f'run failed (exit {proc.returncode})')


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--sizes', default='20,80,320', help='train images per class')
  args = p.parse_args()
  out = {'command': common.command(), 'runs': {}}
  with tempfile.TemporaryDirectory() as tmp:
    for per_class in [int(s) for s in args.sizes.split(',')]:
      root = os.path.join(tmp, f'images{per_class}')
      make_folder(root, per_class)
      r = result(child(root, os.path.join(tmp, f'run{per_class}')))
      out['runs'][f'{per_class * 10} train images'] = r
      print(per_class * 10, 'images: peak RSS', round(r['maxrss_mb']), 'MB',
            flush=True)
    # SIGKILL while the features are written, then resume.
    root = os.path.join(tmp, f'images{per_class}')
    work = os.path.join(tmp, 'killed')
    proc = child(root, work)
    tmp_file = os.path.join(work, 'features.train.npy.tmp0.npy')
    while proc.poll() is None and not os.path.exists(tmp_file):
      time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
    # The features stage was mid-way: its partial memory map there, the
    # finished file not yet.
    partial = os.path.exists(tmp_file)
    finished = os.path.exists(os.path.join(work, 'features.train.npy'))
    resumed = result(child(root, work))
    reference = out['runs'][f'{per_class * 10} train images']
    out['kill'] = {'killed': killed,
                   'partial_features_file_left': partial,
                   'finished_features_file_existed': finished,
                   'resumed_digests': resumed['digests'],
                   'bitwise_equal': resumed['digests'] ==
                                    reference['digests']}
    print('killed:', killed, '; partial features file left:', partial,
          '; finished features file:', finished, '; resumed equal:',
          out['kill']['bitwise_equal'], flush=True)
  path = os.path.join(common.RESULTS, 'onnx_streamed_cpu.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)
  print('wrote', common.show(path))


if __name__ == '__main__':
  main()
