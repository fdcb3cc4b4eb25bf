"""Consistent, patient distillation on Fashion-MNIST: the `:consistent`
recipe beside today's cached-feature `:best`, from one trained teacher.

Every run takes the teacher of `--teacher` (a finished `:best` workdir, e.g.
README command 1's; `teacher.init_from`), so only the students and the head
train, and scores the assembled TCN with the teacher's frozen head on
validation and test after every student epoch (`students.eval_tcn`: the
"patience" curve). Runs go one after another in the background-friendly
way of the command line: rerunning the same command resumes each from its
checkpoints.

  python -m experiments.consistent_fmnist --teacher runs/fmnist --root /data/consistent --runs best_s0,consistent_s0
  python -m experiments.consistent_fmnist --root /data/consistent --report

Runs: `<recipe>_s<seed>` with recipe one of RECIPES (`:best`, `:consistent`
and their ablations); a recipe of HEAD_OF trains only the head again, in a
copy of its source run's workdir (`prepare`). The head is chosen on
validation per run (fine-tuned or the teacher's frozen one, whichever
scores higher on val), and that head's test accuracy is the run's result.
The report also gives each finished run's feature MSE on training and on
validation images (`regression_mse`: whether its students overfit or
underfit). Writes
experiments/results/consistent_fmnist_cpu.{md,json,png}.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys

from experiments import common
from tcn_jax import presets

FMNIST = os.path.join(common.REPO, 'configs', 'fashion_mnist.py')
# `:consistent`'s students (no dropout) at n = 2 (the last two convolutions
# 32 wide: 95.1k in all) and at n = 4 (at n = 2: `:best`'s students without
# their two dropouts, 51.9k in all).
BIG, NODROP = presets.FULL_FMNIST['2'], presets.FULL_FMNIST['4']
# `:consistent`'s views as first measured: padded crops, flips, mixup.
CROPS = ['consistent', '--config.students.views=pad_crop_flip_mixup']
# `:consistent` as first built: `:best`'s students (26.0k each, with
# dropout) and 100 epochs.
SMALL = ['--config.students.epochs=100', '--config.students.arch='
         + presets.with_batchnorm(presets.WIDE_FMNIST)]
RECIPES = {
    'best': ['best'],
    'consistent': ['consistent'],
    'consistent_n4': ['consistent', '--config.num_students=4'],
    'consistent_n8': ['consistent', '--config.num_students=8'],
    # GAN students (a discriminator per student) on the same views.
    'consistent_gan': ['consistent', '--config.method=gan'],
    # Padded crops and flips before the mixup.
    'consistent_crops': CROPS,
    'consistent_crops_n4': CROPS + ['--config.num_students=4'],
    'consistent_crops_n8': CROPS + ['--config.num_students=8'],
    # The head fine-tuned on the students' views, not the clean images.
    'consistent_crops_headviews': CROPS + [
        '--config.head.views=pad_crop_flip_mixup'],
    'consistent_small': CROPS + SMALL,
    # The views without mixup.
    'consistent_small_nomix': ['consistent',
                               '--config.students.views=pad_crop_flip',
                               *SMALL],
    # `:best`'s students regress their training features no better than
    # their validation ones (they underfit): without dropout, and wider.
    'best_nodrop': ['best', f'--config.students.arch={NODROP}'],
    'best_big': ['best', f'--config.students.arch={BIG}'],
    # Patient on the clean images: three times `:best`'s schedule.
    'best_big_long': ['best', f'--config.students.arch={BIG}',
                      '--config.students.epochs=60'],
}
# Recipes that change only the head of another recipe's run: they start
# from a copy of its workdir (same seed), so they train the same students
# and only the head again (`allow_config_change`).
HEAD_OF = {'consistent_crops_headviews': 'consistent_crops'}


def _parse(name):
  return re.fullmatch(r'(\w+?)_s(\d+)', name).groups()


def command(name, teacher, root):
  recipe, seed = _parse(name)
  preset, *extra = RECIPES[recipe]
  if recipe in HEAD_OF:
    extra.append('--config.allow_config_change=True')
  return [sys.executable, '-m', 'tcn_jax.main',
          f'--config={FMNIST}:{preset}',
          f'--workdir={os.path.join(root, name)}',
          f'--config.teacher.init_from={teacher}', f'--config.seed={seed}',
          '--config.students.eval_tcn=True', *extra]


def prepare(name, root):
  """A head-only recipe's workdir: a copy of its source run's (finished:
  every stage but the head is reused), made once."""
  recipe, seed = _parse(name)
  workdir = os.path.join(root, name)
  if recipe not in HEAD_OF or os.path.exists(workdir):
    return
  source = os.path.join(root, f'{HEAD_OF[recipe]}_s{seed}')
  if not os.path.exists(os.path.join(source, 'results.json')):
    raise SystemExit(f'{name} retrains the head of {source}, which is not '
                     'finished: run it first')
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns(
      'head', 'tcn', 'export', 'results.json', 'tensorboard'))


def _curve_so_far(workdir):
  """The curve of a run whose students are still training: the history of
  their last checkpoint (one point per finished epoch), else None."""
  from tcn_jax import checkpoint  # pylint: disable=g-import-not-at-top
  stage = os.path.join(workdir, 'students', 'group0')
  if not checkpoint.finished_epochs(stage):
    return None
  with checkpoint.StageCheckpoint(stage, read_only=True) as ckpt:
    history = ckpt.record()['history']
  return [{'epoch': h['epoch'], 'tcn_val_acc': h['tcn_val_acc'],
           'tcn_test_acc': h['tcn_test_acc']} for h in history
          if 'tcn_val_acc' in h]


def regression_mse(workdir, rows=12000, datasets=None):
  """The finished run's students' mean squared error against the teacher's
  features (feature space, the TCN's joined outputs) on its first `rows`
  training images and on validation: {'train': ..., 'val': ...}. A gap says
  they overfit (views may help); none says they underfit (capacity and
  optimisation may). Training features are the run's cache, else its
  teacher's (`teacher.init_from`: online runs cache only validation).
  `datasets`, a dict, keeps each dataset loaded for the next call."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tcn_jax as tcn  # pylint: disable=g-import-not-at-top
  from tcn_jax import assemble  # pylint: disable=g-import-not-at-top
  from tcn_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = json.load(open(os.path.join(workdir, 'config.json')))
  features = np.load(os.path.join(workdir, 'features.npz'))
  if 'train' not in features.files:
    features = dict(features, train=np.load(os.path.join(
        config['teacher']['init_from'], 'features.npz'))['train'])
  d = config['data']
  args = (d['name'], d['dir'], d['split_seed'], d['val_fraction'],
          d['train_size'], d['test_size'])
  datasets = {} if datasets is None else datasets
  if args not in datasets:
    datasets[args] = tcn.load_dataset(*args)
  ds = datasets[args]
  _, net = tcn.load_tcn(os.path.join(workdir, 'tcn'))
  outputs = assemble.student_outputs_fn(net)
  variables = [g.variables for g in net.groups]

  def mse(x, target):
    out = input_pipeline.batched(lambda xb: outputs(variables, xb), x)
    return float(np.mean((out - target) ** 2))

  return {'train': mse(ds.train.x[:rows], features['train'][:rows]),
          'val': mse(ds.val.x, features['val'])}


def report(root, out=os.path.join(common.RESULTS, 'consistent_fmnist_cpu')):
  """Every run under `root` into `out`.{md,json,png}: a finished run's results,
  and the curve so far of one still training or stopped (unfinished)."""
  rows, running, datasets = {}, {}, {}
  # A run's feature MSE from the last report, where its digests (teacher,
  # students, head) are still the same: only new or rerun runs are scored.
  last = (json.load(open(out + '.json'))['runs']
          if os.path.exists(out + '.json') else {})
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, 'results.json')
    if not os.path.exists(path):
      curve = (os.path.isdir(os.path.join(root, name))
               and _curve_so_far(os.path.join(root, name)))
      if curve:   # Training, or stopped: what its checkpoint holds.
        running[name] = curve
      continue
    r = json.load(open(path))
    tuned = r['tcn_val_acc_after_finetune'] > r['tcn_val_acc_before_finetune']
    epochs = len(r.get('students_curve', []))
    rows[name] = {
        'num_students': r['num_students'],
        'student_params': r['params']['students_total'],
        'teacher_test_acc': r['teacher_test_acc'],
        'head': 'fine-tuned' if tuned else 'frozen (teacher\'s)',
        'val_acc': r['tcn_val_acc_after_finetune' if tuned
                     else 'tcn_val_acc_before_finetune'],
        'test_acc': r['tcn_test_acc_after_finetune' if tuned
                      else 'tcn_test_acc_before_finetune'],
        'val_acc_before_after_finetune': [r['tcn_val_acc_before_finetune'],
                                          r['tcn_val_acc_after_finetune']],
        'student_epochs': epochs,
        'student_seconds_per_epoch': r['train_seconds']['students']
                                     / max(epochs, 1),
        'curve': r.get('students_curve', []),
        'feature_mse': (
            last[name]['feature_mse']
            if last.get(name, {}).get('digests') == r['digests']
            else regression_mse(os.path.join(root, name),
                                datasets=datasets)),
        'digests': r['digests'],
    }
  with open(out + '.json', 'w') as f:
    json.dump({'machine': common.machine(), 'root': root, 'runs': rows,
               'unfinished': running}, f, indent=1)
  m = common.machine()
  lines = ['# Consistent, patient distillation on Fashion-MNIST', '',
           f'Machine: {m.get("cpu")}, {m.get("cores")} cores, AVX-512: '
           f'{m.get("avx512")}. Commands: '
           '`python -m experiments.consistent_fmnist --teacher T --root R '
           '--runs NAME` (see the module). s / student epoch: the run\'s '
           'wall time, on a CPU it often shared with other runs; the '
           'side-by-side cost per epoch is bench_views_cpu.md.', '',
           '| run | n | student params | head (chosen on val) | val | test '
           '| val: frozen / fine-tuned head | teacher test | s / student '
           'epoch | epochs | feature MSE train / val |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for name, r in rows.items():
    frozen, tuned = r['val_acc_before_after_finetune']
    lines.append(
        f'| {name} | {r["num_students"]} | {r["student_params"]:,} | '
        f'{r["head"]} | {100 * r["val_acc"]:.2f} | {100 * r["test_acc"]:.2f}'
        f' | {100 * frozen:.2f} / {100 * tuned:.2f}'
        f' | {100 * r["teacher_test_acc"]:.2f} | '
        f'{r["student_seconds_per_epoch"]:.0f} | {r["student_epochs"]} | '
        f'{r["feature_mse"]["train"]:.3f} / {r["feature_mse"]["val"]:.3f} |')
  lines += ['', '## Curves: the TCN (teacher\'s frozen head) after each '
            'student epoch, val / test %', '']
  curves = {**{n: r['curve'] for n, r in rows.items()},
            **{f'{n} (unfinished)': c for n, c in running.items()}}
  for name, curve in curves.items():
    lines.append(f'- {name}: ' + ', '.join(
        f'{p["epoch"]}: {100 * p["tcn_val_acc"]:.2f} / '
        f'{100 * p["tcn_test_acc"]:.2f}' for p in curve))
  teacher = {r['teacher_test_acc'] for r in rows.values()}
  lines += ['', f'![the curves]({os.path.basename(out)}.png)']
  with open(out + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  plot_curves(curves, teacher.pop() if len(teacher) == 1 else None,
              out + '.png')
  print('\n'.join(lines))


def plot_curves(curves, teacher_test_acc, path):
  """The patience curves {name: [{'epoch', 'tcn_val_acc', 'tcn_test_acc'}]}
  side by side, validation and test, into `path` (needs matplotlib)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
  for ax, split in zip(axes, ('val', 'test')):
    for name, curve in curves.items():
      ax.plot([p['epoch'] for p in curve],   # Views dashed.
              [100 * p[f'tcn_{split}_acc'] for p in curve], label=name,
              ls='--' if name.startswith('consistent') else '-')
    if split == 'test' and teacher_test_acc:
      ax.axhline(100 * teacher_test_acc, color='k', ls=':', label='teacher')
    ax.set_ylim(80, 94)
    ax.set_xlabel('student epoch')
    ax.set_title(f'TCN (teacher\'s frozen head), {split} accuracy (%)')
    ax.grid(alpha=.3)
  axes[1].legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher', help='a finished `:best` workdir')
  parser.add_argument('--root', required=True, help='where runs go')
  parser.add_argument('--runs', default='', help='comma-separated names')
  parser.add_argument('--report', action='store_true')
  args = parser.parse_args()
  for name in filter(None, args.runs.split(',')):
    prepare(name, args.root)
    cmd = command(name, args.teacher, args.root)
    print(' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=common.REPO)
  if args.report:
    report(args.root)


if __name__ == '__main__':
  main()
