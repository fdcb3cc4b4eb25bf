"""End to end on a real Fashion-MNIST subset: accuracy floors, checkpoints,
rerun skipping finished stages, the assembled TCN, a changed config (kills,
bad inputs and the command line: test_resume.py, test_bad_inputs.py)."""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import needs_fmnist, tiny_config
from tcn_jax import assemble
from tcn_jax import augment
from tcn_jax import baselines
from tcn_jax import checkpoint
from tcn_jax import config as config_lib
from tcn_jax import data
from tcn_jax import engine
from tcn_jax import features
from tcn_jax import head
from tcn_jax import models
from tcn_jax import pipeline
from tcn_jax import record
from tcn_jax.errors import TCNError

pytestmark = needs_fmnist
N = 2   # Students in the end-to-end runs (keeps the suite fast).


@pytest.fixture
def run_dir(smoke_run):
  """The shared smoke run (conftest.py): n = N students, KD and KDGAN."""
  assert smoke_run.config.num_students == N
  return smoke_run


@pytest.mark.slow
def test_accuracy_floors(run_dir):
  _, _, r = run_dir
  assert r['teacher_test_acc'] > 0.70           # chance is 0.10
  assert r['tcn_test_acc_after_finetune'] > 0.35
  assert r['tcn_test_acc_before_finetune'] > 0.15
  assert len(r['student_val_mse']) == N
  assert r['params']['students_total'] == sum(r['params']['students_each'])


@pytest.mark.slow
def test_results_name_the_paper_and_the_stage_keys(run_dir):
  """results.json puts the paper's Table 3 numbers beside the run's and
  records the keys of the stages it was computed from (as in the workdir's
  stage_keys.json)."""
  _, workdir, r = run_dir
  assert r['paper'] == {'tcn': 89.43, 'teacher': 91.98}   # F-MNIST, FF, n=2
  with open(os.path.join(workdir, 'stage_keys.json')) as f:
    keys = json.load(f)
  assert set(r['stage_keys']) == {'teacher', 'students', 'head'}
  assert all(keys[s] == k for s, k in r['stage_keys'].items())


@pytest.mark.slow
def test_kd_and_kdgan_baselines(run_dir):
  _, _, r = run_dir
  kd, kdgan = r['kd'], r['kdgan']
  assert kd['params'] == kdgan['params'] == 45_625   # ~ the students' 45,600
  assert kd['test_acc'] > 0.5 and kdgan['test_acc'] > 0.5   # chance is 0.1
  assert (kd['temperature'], kd['alpha']) == (4.0, 0.9)


@pytest.mark.slow
def test_losses_fall_and_histories_saved(run_dir):
  _, workdir, _ = run_dir
  for stage in ('teacher', 'students/group0', 'head'):
    with checkpoint.StageCheckpoint(os.path.join(workdir, stage)) as ckpt:
      record = ckpt.record()
    losses = np.array([h['train_loss'] for h in record['history']])
    assert (losses[-1] < losses[0]).all(), (stage, losses)


@pytest.mark.slow
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


@pytest.mark.slow
def test_rerun_skips_finished_stages(run_dir, tmp_path):
  config, finished, r = run_dir
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  again = pipeline.run(config, workdir)
  for key in ('teacher_test_acc', 'tcn_test_acc_before_finetune',
              'tcn_test_acc_after_finetune', 'student_val_mse'):
    assert again[key] == r[key]
  assert again['wall_seconds_this_run']['students'] < (
      r['wall_seconds_this_run']['students'])


@pytest.mark.slow
def test_finished_head_needs_no_train_outputs(run_dir):
  """Resuming a finished head stage runs the students on the val and test
  splits only (the train outputs are needed only to train the head; val
  scores the head for choosing a recipe)."""
  config, workdir, r = run_dir
  _, tcn = assemble.load_tcn(os.path.join(workdir, 'tcn'))
  ds = data.load(config.data)
  no_train = dataclasses.replace(ds, train=data.Split(x=None, y=ds.train.y))
  _, info = head.finetune_head(
      tcn, no_train, epochs=config_lib.resolve(config).head.epochs,
      batch_size=config.head.batch_size, workdir=workdir)
  assert info['test_acc_after'] == pytest.approx(
      r['tcn_test_acc_after_finetune'], abs=1e-6)
  assert info['val_acc_after'] == pytest.approx(
      r['tcn_val_acc_after_finetune'], abs=1e-6)
  assert checkpoint.finished_epochs(os.path.join(workdir, 'nothing')) == 0
  assert not os.path.exists(os.path.join(workdir, 'nothing'))


@pytest.mark.slow
@pytest.mark.parametrize('stage', ['kd', 'kdgan'])
def test_finished_baseline_needs_no_teacher_logits(run_dir, stage):
  """Resuming a finished KD / KDGAN stage restores and tests the student
  without running the teacher over the training images."""
  config, workdir, r = run_dir
  ds = data.load(config.data)

  class NoTeacher:
    def apply(self, *unused):
      raise AssertionError('teacher logits computed for a finished stage')

  teacher = record.Teacher(NoTeacher(), None, 0.0, 0.0, '')
  feats = record.Features(   # Only the training features' width is read.
      np.zeros((len(ds.train.y), 256), np.float32), None, None, '')
  run = record.Run(config_lib.resolve(config), workdir, ds, '')
  out = baselines.run_stage(run, stage, teacher, feats)
  assert out['test_acc'] == pytest.approx(r[stage]['test_acc'], abs=1e-6)
  assert out['params'] == r[stage]['params']


@pytest.mark.slow
def test_changed_config_is_refused(run_dir):
  config, workdir, _ = run_dir
  changed = config.copy_and_resolve_references()
  changed.students.learning_rate = 0.5
  with pytest.raises(TCNError, match='students.learning_rate'):
    pipeline.run(changed, workdir)


def _adam_steps(stage_dir):
  with checkpoint.StageCheckpoint(stage_dir) as ckpt:
    state, _ = ckpt.restore()
  counts = {int(np.asarray(leaf).ravel()[0]) for path, leaf in
            jax.tree_util.tree_leaves_with_path(state['opt_state'])
            if 'count' in jax.tree_util.keystr(path)}
  assert len(counts) == 1, counts
  return counts.pop()


@pytest.mark.slow
def test_flip_augmentation_targets_and_steps(tmp_path):
  """augment='mirror': the students' extra targets are the teacher's
  features of the mirrored images, and they take twice the steps per epoch."""
  config = tiny_config(data__augment='mirror')
  pipeline.run(config, str(tmp_path))
  c, ds = config.teacher, data.load(config.data)
  epochs, batch = config.students.epochs, config.students.batch_size
  assert _adam_steps(str(tmp_path / 'students' / 'group0')) == (
      epochs * (2 * len(ds.train) // batch))
  with np.load(tmp_path / 'features.npz') as f:
    train_feats, flip_feats = f['train'], f['train_flip']
  teacher = models.Teacher(c.body, 10, c.head_dropout, config.layers_impl,
                           c.head_bn)
  with checkpoint.StageCheckpoint(str(tmp_path / 'teacher')) as ckpt:
    state, _ = ckpt.restore()
  variables = {'params': engine.unstack(state['params'], 1)[0]}
  np.testing.assert_allclose(
      flip_feats, features.teacher_features(teacher, variables,
                                            augment.hflip(ds.train.x)),
      rtol=1e-4, atol=1e-5)
  assert np.abs(flip_feats - train_feats).max() > 1e-2
