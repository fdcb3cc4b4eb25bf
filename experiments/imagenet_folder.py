"""configs/imagenet.py:smoke end to end on a generated ILSVRC-layout folder.

  KERAS_BACKEND=jax python -m experiments.imagenet_folder \\
      --dir /tmp/ilsvrc --workdir /tmp/ilsvrc_runs

Writes a folder in ImageNet's layout (train/<wnid>/<wnid>_<i>.JPEG and
val/<wnid>/..., the split the loader reads as test) of procedural images:
per class a stripe pattern of its own angle and frequency with a random
phase, tint and noise, at varying sizes (the loader resizes the shorter side
and centre-crops). Then runs the command line twice on it with
`--config.data.layout=folder`: (a) the smoke teacher trained by the
pipeline; (b) `--config.teacher.init_from=` a keras.applications.ResNet50
(weights=None: random weights, as no weights can be downloaded here) saved
as a `.keras` file, with `--config.teacher.body` set to the config's
RESNET50 (Keras' layout, layer for layer) so the library converts it.
The Keras model is built with `classes=` the folder's class count: the
converter maps the head Dense by shape, and the teacher's head has one
output per folder class (a 1000-class ImageNet head needs the 1000 ILSVRC
classes). Writes experiments/results/imagenet_folder_cpu.md and .json.

`make_folder` is also what experiments/chaos.py streams from.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from experiments import common

# The first ILSVRC2012 wnids (sorted), as the folders of the real data.
WNIDS = ('n01440764', 'n01443537', 'n01484850', 'n01491361', 'n01494475',
         'n01496331', 'n01498041', 'n01514668', 'n01514859', 'n01518878')
RESULTS = os.path.join(common.REPO, 'experiments', 'results')


def make_folder(root, classes=4, train_per_class=80, val_per_class=12,
                size=64, seed=0, names=WNIDS):
  """Writes train/<name>/*.JPEG and val/<name>/*.JPEG under `root`: class c
  is a stripe pattern (angle and frequency its own; phase, tint, noise and
  a size within 1..1.5x `size` per image, seeded). Returns the class names."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if classes > len(names):
    raise ValueError(f'at most {len(names)} classes')
  rng = np.random.default_rng(seed)
  for split, n in (('train', train_per_class), ('val', val_per_class)):
    for c, wnid in enumerate(names[:classes]):
      os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
      angle, freq = np.pi * c / classes, 2 + 1.5 * c
      for i in range(n):
        h, w = (int(size * s) for s in rng.uniform(1, 1.5, 2))
        yy, xx = np.mgrid[0:h, 0:w] / size
        wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle)
                                          * yy) + rng.uniform(0, 2 * np.pi))
        tint = rng.uniform(0.3, 1.0, 3)
        img = 0.5 + 0.4 * wave[..., None] * tint + rng.normal(0, 0.15,
                                                              (h, w, 3))
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
            os.path.join(root, split, wnid, f'{wnid}_{i}.JPEG'), quality=90)
  return list(names[:classes])


def save_keras_resnet50(path, size, classes, seed=0):
  """keras.applications.ResNet50 with random weights (weights=None) for
  `size`x`size` inputs and `classes` outputs, saved whole to `path`."""
  os.environ.setdefault('KERAS_BACKEND', 'jax')
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(seed)
  model = keras.applications.ResNet50(weights=None,
                                      input_shape=(size, size, 3),
                                      classes=classes)
  model.save(path)
  return model.count_params()


def run_cli(workdir, flags, log_path):
  """One CLI run; returns (results.json, wall seconds, load averages before
  and after)."""
  cmd = [sys.executable, '-m', 'tcn_jax.main', '--config',
         'configs/imagenet.py:smoke', '--workdir', workdir, *flags]
  load0, t = os.getloadavg(), time.time()
  with open(log_path, 'w') as log:
    rc = subprocess.run(cmd, cwd=common.REPO, stdout=log,
                        stderr=subprocess.STDOUT, check=False).returncode
  wall, load1 = time.time() - t, os.getloadavg()
  if rc:
    with open(log_path) as f:
      sys.exit(f'run failed (exit {rc}):\n' + f.read()[-3000:])
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f), wall, [load0, load1], ' '.join(
        ['python -m tcn_jax.main --config configs/imagenet.py:smoke',
         '--workdir', workdir] + [f"'{x}'" if ' ' in x else x for x in flags])


def main():
  """Writes the folder, runs (a) and (b), writes the report."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dir', default='/tmp/ilsvrc_folder')
  parser.add_argument('--workdir', default='/tmp/ilsvrc_runs')
  parser.add_argument('--classes', type=int, default=4)
  parser.add_argument('--train_per_class', type=int, default=80)
  parser.add_argument('--val_per_class', type=int, default=12)
  parser.add_argument('--size', type=int, default=64,
                      help='image size of the runs (data.image_size)')
  parser.add_argument('--epochs', type=int, default=2,
                      help='teacher, students and head epochs')
  parser.add_argument('--streaming', default='always',
                      help="data.streaming: 'always' decodes the folder "
                      'while training (as full ImageNet must)')
  parser.add_argument('--out', default=RESULTS)
  args = parser.parse_args()
  command = 'KERAS_BACKEND=jax ' + common.command(
      module='experiments.imagenet_folder', quote=False)
  commit = subprocess.run(
      ['git', '-C', common.REPO, 'rev-parse', '--short', 'HEAD'], text=True,
      capture_output=True).stdout.strip()
  sys.path.insert(0, os.path.join(common.REPO, 'configs'))
  import imagenet  # pylint: disable=g-import-not-at-top
  for d in (args.dir, args.workdir):
    shutil.rmtree(d, ignore_errors=True)
  t = time.time()
  classes = make_folder(args.dir, args.classes, args.train_per_class,
                        args.val_per_class, args.size)
  folder_seconds = time.time() - t
  os.makedirs(args.workdir)
  flags = ['--config.data.layout=folder', f'--config.data.dir={args.dir}',
           f'--config.data.image_size={args.size}',
           '--config.data.val_fraction=0.1',
           f'--config.data.streaming={args.streaming}',
           *(f'--config.{s}.epochs={args.epochs}'
             for s in ('teacher', 'students', 'head'))]
  runs = {}
  keras_path = os.path.join(args.workdir, 'resnet50_random.keras')
  t = time.time()
  keras_params = save_keras_resnet50(keras_path, args.size, len(classes))
  keras_seconds = time.time() - t
  for name, extra in (
      ('a_trained_teacher', []),
      ('b_keras_resnet50', [f'--config.teacher.body={imagenet.RESNET50}',
                            f'--config.teacher.init_from={keras_path}'])):
    workdir = os.path.join(args.workdir, name)
    r, wall, loads, cmd = run_cli(workdir, flags + extra, workdir + '.log')
    with open(workdir + '.log', errors='replace') as f:
      log = f.read()
    runs[name] = {
        'command': cmd, 'wall_seconds': round(wall, 1),
        'loadavg_before_after': [[round(x, 2) for x in l] for l in loads],
        'data_source': r['data_source'], 'params': r['params'],
        'teacher_test_acc': r['teacher_test_acc'],
        'tcn_test_acc_before_finetune': r['tcn_test_acc_before_finetune'],
        'tcn_test_acc_after_finetune': r['tcn_test_acc_after_finetune'],
        'stage_wall_seconds': {k: round(v, 2) for k, v in
                               r['wall_seconds_this_run'].items()},
        'train_seconds': {k: round(v, 2) for k, v in
                          r['train_seconds'].items()},
        'digests': r['digests'],
        'log_lines': [l.split('] ', 1)[-1] for l in log.splitlines()
                      if 'data: ' in l or 'features: ' in l
                      or 'init_from' in l or 'accuracy' in l]}
    print(name, json.dumps(runs[name], indent=1), flush=True)
  report = {
      'command': command, 'commit': commit,
      'folder': {'dir': args.dir, 'classes': classes,
                 'train_images': args.train_per_class * len(classes),
                 'val_images': args.val_per_class * len(classes),
                 'image_sizes': f'{args.size}..{int(args.size * 1.5)} px '
                                'per side, JPEG', 'seconds': round(
                                    folder_seconds, 1)},
      'keras_teacher': {'file': keras_path, 'params': keras_params,
                        'build_and_save_seconds': round(keras_seconds, 1)},
      'streaming': args.streaming,
      'chance_accuracy': 1 / len(classes), 'cpu_count': os.cpu_count(),
      'loadavg_end': [round(x, 2) for x in os.getloadavg()], 'runs': runs}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'imagenet_folder_cpu.json'), 'w') as f:
    json.dump(report, f, indent=1)
  write_markdown(report, os.path.join(args.out, 'imagenet_folder_cpu.md'))


def write_markdown(report, path):
  """imagenet_folder_cpu.md from the report (the JSON's contents)."""
  f, k = report['folder'], report['keras_teacher']
  lines = [
      '# configs/imagenet.py:smoke on a generated ILSVRC-layout folder (CPU)',
      '', '```bash', report['command'], '```', '',
      f'Commit {report["commit"]}. The script writes {f["train_images"]} '
      f'train and {f["val_images"]} val images ({len(f["classes"])} wnid '
      f'folders {", ".join(f["classes"])}; {f["image_sizes"]}; procedural '
      f'stripes, one angle and frequency per class) in {f["seconds"]} s, '
      'then runs the command line twice on it. (b) converts a Keras '
      f'`keras.applications.ResNet50(weights=None)` ({k["params"]:,} '
      'parameters, random weights: nothing can be downloaded here) saved as '
      '`.keras`; it is built with as many classes as the folder has, since '
      'the converter maps the head Dense by shape (a 1000-class ImageNet '
      'head needs the 1000 ILSVRC classes). Its accuracy is chance level '
      f'(1/{len(f["classes"])} = {report["chance_accuracy"]:.2f}) by '
      'construction, and its students distil a random network, so (b) says '
      'only that the conversion and the pipeline ran; the head fine-tuned on '
      'their outputs may still beat chance. (a)\'s teacher, trained for a '
      'few epochs, can learn the stripes (the images are not noise). '
      f'`data.streaming={report.get("streaming", "auto")}`: '
      + ('the splits are decoded by Grain while each stage trains, as a '
         'full ImageNet folder must be (the data column). '
         if report.get('streaming') == 'always' else
         'the splits are small enough to be held in memory. ') +
      f'Machine: {report["cpu_count"]} CPU cores, shared with other jobs '
      '(load averages below), so the seconds are only indicative.', '',
      '| run | teacher | data | teacher acc | TCN acc before / after '
      'fine-tuning | stage wall seconds | wall s | load avg (1, 5, 15 min) '
      'before -> after |', '|---|---|---|---|---|---|---|---|']
  for name, r in report['runs'].items():
    teacher = ('Keras ResNet-50, converted (init_from)' if 'keras' in name
               else 'smoke ResNet, trained by the pipeline')
    stages = ', '.join(f'{s} {v}' for s, v in r['stage_wall_seconds'].items())
    lb, la = r['loadavg_before_after']
    lines.append(
        f'| {name} | {teacher} ({r["params"]["teacher"]:,} params) | '
        f'{r["data_source"]} | {r["teacher_test_acc"]:.3f} | '
        f'{r["tcn_test_acc_before_finetune"]:.3f} / '
        f'{r["tcn_test_acc_after_finetune"]:.3f} | {stages} | '
        f'{r["wall_seconds"]} | {lb} -> {la} |')
  lines += ['', 'Commands:', '']
  for name, r in report['runs'].items():
    lines += [f'- {name}:', '', '  ```bash', f'  {r["command"]}', '  ```', '']
    lines += ['  Log: ' + '; '.join(f'`{l}`' for l in r['log_lines']), '']
  with open(path, 'w') as out:
    out.write('\n'.join(lines))


if __name__ == '__main__':
  main()
