"""End to end on a real Fashion-MNIST subset: accuracy floors, checkpoints,
resume after a kill, the assembled TCN, and the command line."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import needs_fmnist, ROOT
from tcn_jax import assemble
from tcn_jax import data
from tcn_jax import train
from tcn_jax.errors import TCNError

pytestmark = needs_fmnist
N = 2   # Students in the end-to-end runs (keeps the suite fast).


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config('smoke')
  config.num_students = N
  workdir = str(tmp_path_factory.mktemp('run'))
  results = train.run(config, workdir)
  return config, workdir, results


def test_accuracy_floors(run_dir):
  _, _, r = run_dir
  assert r['teacher_test_acc'] > 0.70           # chance is 0.10
  assert r['tcn_test_acc_after_finetune'] > 0.35
  assert r['tcn_test_acc_before_finetune'] > 0.15
  assert len(r['student_val_mse']) == N
  assert r['params']['students_total'] == sum(r['params']['students_each'])


def test_losses_fall_and_histories_saved(run_dir):
  _, workdir, _ = run_dir
  from tcn_jax import checkpoint  # pylint: disable=g-import-not-at-top
  for stage in ('teacher', 'students/group0', 'head'):
    ckpt = checkpoint.StageCheckpoint(os.path.join(workdir, stage))
    record = ckpt.manager.restore(
        ckpt.latest_epoch(),
        args=checkpoint.ocp.args.Composite(
            record=checkpoint.ocp.args.JsonRestore())).record
    losses = np.array([h['train_loss'] for h in record['history']])
    assert (losses[-1] < losses[0]).all(), (stage, losses)


def test_load_tcn_reproduces_accuracy(run_dir):
  config, workdir, r = run_dir
  predict, tcn = assemble.load_tcn(os.path.join(workdir, 'tcn'))
  assert tcn.num_students == N
  ds = data.load(config.data)
  logits = np.concatenate([predict(ds.test.x[i:i + 500])
                           for i in range(0, len(ds.test), 500)])
  assert logits.shape == (len(ds.test), 10)
  acc = float(np.mean(logits.argmax(-1) == ds.test.y))
  assert acc == pytest.approx(r['tcn_test_acc_after_finetune'], abs=1e-3)


def test_rerun_skips_finished_stages(run_dir):
  config, workdir, r = run_dir
  t = time.time()
  again = train.run(config, workdir)
  for key in ('teacher_test_acc', 'tcn_test_acc_before_finetune',
              'tcn_test_acc_after_finetune', 'student_val_mse'):
    assert again[key] == r[key]
  assert again['wall_seconds_this_run']['students'] < (
      r['wall_seconds_this_run']['students'])


def test_changed_config_is_refused(run_dir):
  config, workdir, _ = run_dir
  changed = config.copy_and_resolve_references()
  changed.students.learning_rate = 0.5
  with pytest.raises(TCNError, match='students.learning_rate'):
    train.run(changed, workdir)


def _cli(workdir, *overrides, **kw):
  cmd = [sys.executable, '-m', 'tcn_jax.main',
         '--config', os.path.join(ROOT, 'configs/fashion_mnist.py:smoke'),
         '--workdir', workdir, f'--config.num_students={N}', *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kw)


def test_cli_killed_in_students_resumes_to_same_results(run_dir, tmp_path):
  """SIGKILL after the first student epoch, run again: same numbers as an
  uninterrupted in-process run with the same config and seed."""
  _, _, expected = run_dir
  workdir = str(tmp_path / 'cli')
  proc = _cli(workdir)
  marker = os.path.join(workdir, 'students', 'group0', '1')
  deadline = time.time() + 600
  while not os.path.exists(marker) and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  proc = _cli(workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-2000:]
  assert 'resuming after epoch' in out
  with open(os.path.join(workdir, 'results.json')) as f:
    got = json.load(f)
  for key in ('teacher_test_acc', 'tcn_test_acc_before_finetune',
              'tcn_test_acc_after_finetune'):
    assert got[key] == expected[key], key
  np.testing.assert_allclose(got['student_val_mse'],
                             expected['student_val_mse'], rtol=1e-6)


@pytest.mark.parametrize('override, message', [
    ('--config.num_students=0', 'num_students'),
    ('--config.data.name=cifar100', "unknown dataset 'cifar100'"),
    ('--config.students.strategy=magic', "unknown strategy 'magic'"),
    ('--config.method=diffusion', "unknown method 'diffusion'"),
    ('--config.data.dir=/nonexistent', '/nonexistent'),
    ('--config.teacher.optimizer=rmsprop', 'config.teacher.optimizer'),
    ('--config.num_students=300', 'larger than the feature width'),
])
def test_bad_config_gives_one_line_error(tmp_path, override, message):
  proc = _cli(str(tmp_path / 'bad'), override)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  errors = [l for l in out.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and message in errors[0], out[-1500:]


def test_load_tcn_on_other_directory(tmp_path):
  with pytest.raises(TCNError, match='no TCN checkpoint'):
    assemble.load_tcn(str(tmp_path))
  with pytest.raises(TCNError, match='not a directory'):
    assemble.load_tcn(str(tmp_path / 'missing'))
