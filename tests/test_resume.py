"""Resume and determinism, through the command line: a run stopped in every
stage (SIGKILL, also mid checkpoint write; SIGTERM; FF and GAN students; a
streamed epoch between two step checkpoints) and started again with the same
command ends bitwise equal to an uninterrupted run; the same seed gives the
same results and another seed other ones."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import needs_fmnist, ROOT, SMOKE, TINY_FLAGS
from tcn_jax import assemble
from tcn_jax import checkpoint
from tcn_jax import main
from tcn_jax.errors import Interrupted

pytestmark = needs_fmnist
TIMING = ('wall_seconds_this_run', 'train_seconds')


def _start(workdir, log_path, *flags):
  cmd = [sys.executable, '-m', 'tcn_jax.main', '--config', SMOKE,
         '--workdir', workdir, *TINY_FLAGS, *flags]
  with open(log_path, 'w') as log:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)


def _read(path):
  with open(path, errors='replace') as f:
    return f.read()


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return {k: v for k, v in json.load(f).items() if k not in TIMING}


def _tmp_dirs(workdir):
  """Orbax checkpoints being written (renamed when complete)."""
  return glob.glob(os.path.join(workdir, '**', '*orbax-checkpoint-tmp*'),
                   recursive=True)


# Where each start of the interrupted run is stopped: (name, signal, when),
# `when(workdir, this start's log)`. The last start runs to the end.
STOPS = [
    ('teacher checkpoint write', signal.SIGKILL,
     lambda w, log: _tmp_dirs(os.path.join(w, 'teacher'))),
    ('teacher', signal.SIGKILL, lambda w, log: '[teacher] epoch 1/2' in log),
    ('features', signal.SIGTERM,
     lambda w, log: 'teacher test accuracy' in log),
    ('students start', signal.SIGKILL,
     lambda w, log: os.path.exists(os.path.join(w, 'features.npz'))),
    ('students', signal.SIGKILL,
     lambda w, log: '[students[0,1]] epoch 1/2' in log),
    ('head', signal.SIGKILL, lambda w, log: '[head] epoch 1/2' in log),
]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Three uninterrupted runs (seed 0 twice, seed 1), then one run stopped
  at every STOPS entry and started again each time."""
  base = str(tmp_path_factory.mktemp('resume'))
  plain = {name: (os.path.join(base, name), flags) for name, flags in (
      ('seed0', ()), ('seed0_again', ()), ('seed1', ('--config.seed=1',)))}
  procs = {name: _start(wd, wd + '.log', *flags)
           for name, (wd, flags) in plain.items()}
  for name, proc in procs.items():
    assert proc.wait(timeout=900) == 0, _read(plain[name][0] + '.log')[-3000:]

  workdir, starts = os.path.join(base, 'stopped'), []
  for i in range(len(STOPS) + 1):
    log_path = f'{workdir}.{i}.log'
    proc = _start(workdir, log_path)
    stop = STOPS[i] if i < len(STOPS) else None
    writing = False
    deadline = time.time() + 600
    while stop and proc.poll() is None:
      assert time.time() < deadline, f'stop {stop[0]!r} never came'
      if stop[2](workdir, _read(log_path)):
        writing = bool(_tmp_dirs(workdir))
        proc.send_signal(stop[1])
        break
      time.sleep(0.002)
    rc = proc.wait(timeout=600)
    starts.append({'name': stop[0] if stop else 'end', 'rc': rc,
                   'log': _read(log_path), 'writing': writing})
  return {name: wd for name, (wd, _) in plain.items()}, workdir, starts


def _start_named(starts, name):
  i = [s['name'] for s in starts].index(name)
  return starts[i], (starts[i + 1] if i + 1 < len(starts) else None)


@pytest.mark.slow
def test_killed_mid_checkpoint_write(runs):
  _, workdir, starts = runs
  stopped, after = _start_named(starts, 'teacher checkpoint write')
  assert stopped['rc'] == -signal.SIGKILL and stopped['writing']
  assert '[teacher] epoch 1/2' in after['log']
  assert not _tmp_dirs(workdir)   # Leftovers are removed on the next start.


@pytest.mark.slow
@pytest.mark.parametrize('name, resumed', [
    ('teacher', r'[teacher] resuming after epoch '),
    ('students start', 'features: reusing'),
    ('students', '[students[0,1]] resuming after epoch '),
    ('head', '[head] resuming after epoch '),
])
def test_killed_in_stage_resumes(runs, name, resumed):
  _, _, starts = runs
  stopped, after = _start_named(starts, name)
  assert stopped['rc'] == -signal.SIGKILL
  assert resumed in after['log'], after['log'][-2000:]


@pytest.mark.slow
def test_no_start_fails(runs):
  """Only the SIGTERM stop prints an error line; nothing crashes."""
  _, _, starts = runs
  for start in starts:
    errors = [l for l in start['log'].splitlines() if l.startswith('error: ')]
    assert len(errors) == (start['name'] == 'features'), start['log'][-2000:]
    assert 'Traceback' not in start['log'], start['log'][-3000:]


@pytest.mark.slow
def test_sigterm_stops_with_one_line_and_resumes(runs):
  _, _, starts = runs
  stopped, after = _start_named(starts, 'features')
  assert stopped['rc'] == 128 + signal.SIGTERM, stopped['log'][-2000:]
  errors = [l for l in stopped['log'].splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'stopped by SIGTERM' in errors[0], errors
  assert '[teacher] resuming after epoch 2/2' in after['log']


@pytest.mark.slow
def test_stopped_run_ends_bitwise_equal_to_uninterrupted(runs):
  plain, workdir, starts = runs
  assert starts[-1]['rc'] == 0, starts[-1]['log'][-3000:]
  assert _results(workdir) == _results(plain['seed0'])
  for stage in ('teacher', 'tcn'):
    trees = []
    for w in (workdir, plain['seed0']):
      with checkpoint.StageCheckpoint(os.path.join(w, stage),
                                      read_only=True) as ckpt:
        trees.append(ckpt.restore()[0])
    leaves = [checkpoint.jax.tree_util.tree_leaves(t) for t in trees]
    assert len(leaves[0]) == len(leaves[1]) > 0
    for a, b in zip(*leaves):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, tcn = assemble.load_tcn(os.path.join(workdir, 'tcn'))
  assert checkpoint.digest([g.variables for g in tcn.groups],
                           tcn.head_variables) == (
      _results(workdir)['digests']['tcn'])


@pytest.mark.slow
def test_same_seed_same_results_other_seed_other(runs):
  plain, _, _ = runs
  first, again, other = (_results(plain[n])
                         for n in ('seed0', 'seed0_again', 'seed1'))
  assert first == again
  assert first['digests']['teacher'] != other['digests']['teacher']
  assert first['digests']['tcn'] != other['digests']['tcn']
  assert first['student_val_mse'] != other['student_val_mse']


def test_stop_signal_waits_for_the_checkpoint_write(tmp_path, monkeypatch):
  """SIGINT during a save is raised when the write is complete."""
  old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  signal.signal(signal.SIGINT, main._stop)  # pylint: disable=protected-access
  try:
    ckpt = checkpoint.StageCheckpoint(str(tmp_path / 'stage'))
    finish = ckpt.manager.wait_until_finished

    def interrupted_wait():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)    # The handler would run here without the deferral.
      finish()

    monkeypatch.setattr(ckpt.manager, 'wait_until_finished', interrupted_wait)
    with pytest.raises(Interrupted) as e:
      ckpt.save(1, {'w': np.arange(3.0)}, {'epoch': 1})
    assert e.value.exit_code == 128 + signal.SIGINT
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
  with checkpoint.StageCheckpoint(str(tmp_path / 'stage'),
                                  read_only=True) as ckpt:
    state, record = ckpt.restore()
  np.testing.assert_array_equal(state['w'], np.arange(3.0))
  assert record == {'epoch': 1}


@pytest.mark.slow
def test_gan_students_killed_resume_bitwise(tmp_path):
  """GAN students (generator, discriminator and both optimizer states)
  resume bitwise too."""
  ref = str(tmp_path / 'ref')
  ref_proc = _start(ref, ref + '.log', '--config.method=gan')
  workdir = str(tmp_path / 'stopped')
  proc = _start(workdir, workdir + '.0.log', '--config.method=gan')
  marker = os.path.join(workdir, 'students', 'group0', '1')
  while proc.poll() is None and not os.path.exists(marker):
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=600) == -signal.SIGKILL
  proc = _start(workdir, workdir + '.1.log', '--config.method=gan')
  assert proc.wait(timeout=600) == 0, _read(workdir + '.1.log')[-3000:]
  assert '[students[0,1]] resuming after epoch' in _read(workdir + '.1.log')
  assert ref_proc.wait(timeout=600) == 0, _read(ref + '.log')[-3000:]
  assert _results(workdir) == _results(ref)


def _image_folder(root):
  """train/ (3 classes x 14) and val/ (3 x 3) of random 12x12 PNG images."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, n in (('train', 14), ('val', 3)):
    for c in range(3):
      os.makedirs(os.path.join(root, split, f'class{c}'))
      for i in range(n):
        Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8)).save(
            os.path.join(root, split, f'class{c}', f'{i}.png'))


@pytest.mark.slow
def test_streamed_epoch_killed_between_step_checkpoints(tmp_path):
  """A streamed teacher epoch (image folder, a step checkpoint every 3 of
  its 18 steps) killed right after its first step checkpoint resumes at a
  step checkpoint and ends bitwise equal to an uninterrupted run."""
  _image_folder(str(tmp_path / 'images'))
  flags = ['--config', os.path.join(ROOT, 'configs/image_folder.py:smoke'),
           f'--config.data.dir={tmp_path / "images"}',
           '--config.data.streaming=always', '--config.data.val_fraction=0.1',
           '--config.data.checkpoint_every_steps=3', '--config.num_students=1',
           '--config.teacher.body=C4 MP F D16r', '--config.teacher.epochs=1',
           '--config.teacher.batch_size=2',
           '--config.students.arch=C4 MP F D8r',
           '--config.students.epochs=1', '--config.head.epochs=1']

  def start(workdir, log_path):
    with open(log_path, 'w') as log:
      return subprocess.Popen(
          [sys.executable, '-m', 'tcn_jax.main', '--workdir', workdir, *flags],
          cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

  ref, workdir = str(tmp_path / 'ref'), str(tmp_path / 'killed')
  ref_proc = start(ref, ref + '.log')
  proc = start(workdir, workdir + '.0.log')
  steps = os.path.join(workdir, 'teacher', 'steps')
  deadline = time.time() + 300
  while proc.poll() is None and not (
      os.path.isdir(steps) and any(n.isdigit() for n in os.listdir(steps))):
    assert time.time() < deadline, 'no step checkpoint came'
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL, _read(workdir + '.0.log')
  assert '[teacher] epoch 1/1' not in _read(workdir + '.0.log')  # Mid-epoch.
  proc = start(workdir, workdir + '.1.log')
  assert proc.wait(timeout=300) == 0, _read(workdir + '.1.log')[-3000:]
  assert ref_proc.wait(timeout=300) == 0, _read(ref + '.log')[-3000:]
  log = _read(workdir + '.1.log')
  resumed = re.search(r'\[teacher\] resuming epoch 1 at step (\d+)', log)
  assert resumed and int(resumed[1]) % 3 == 0, log[-3000:]
  assert _results(workdir) == _results(ref)
  assert 'streamed' in _results(ref)['data_source']
  tcns = [assemble.load_tcn(os.path.join(w, 'tcn'))[1] for w in (workdir, ref)]
  leaves = [jax.tree_util.tree_leaves(
      ([g.variables for g in t.groups], t.head_variables)) for t in tcns]
  assert len(leaves[0]) == len(leaves[1]) > 0
  for a, b in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
