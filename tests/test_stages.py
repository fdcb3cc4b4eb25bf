"""The stage-reuse rule: a rerun reuses a stage only when its key (config
section, upstream keys, data, seed) matches. A changed upstream field
retrains that stage and everything downstream; a changed downstream field
keeps the upstream stages bitwise; without allow_config_change a changed
config is refused before anything is written."""
import hashlib
import json
import os

import pytest

from helpers import needs_fmnist, tiny_config
from tcn_jax import pipeline
from tcn_jax.errors import TCNError

pytestmark = needs_fmnist


def _fingerprint(directory):
  """SHA-256 over every file (relative path and bytes) under `directory`."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, directory).encode())
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def _stages(workdir):
  return {s: _fingerprint(os.path.join(workdir, s))
          for s in ('teacher', 'students', 'head')}


def _run(workdir, **overrides):
  return pipeline.run(tiny_config(allow_config_change=True, **overrides),
                      workdir)


@pytest.fixture(scope='module')
def first(tiny_run):
  """The shared finished tiny run: (workdir, results, stage fingerprints)."""
  return tiny_run.workdir, tiny_run.results, _stages(tiny_run.workdir)


@pytest.fixture(scope='module')
def fresh(tmp_path_factory):
  """fresh(**overrides): the results of a fresh run of tiny_config(
  **overrides), computed once per module (tests only read them)."""
  runs = {}

  def run(**overrides):
    key = tuple(sorted(overrides.items()))
    if key not in runs:
      runs[key] = pipeline.run(tiny_config(**overrides),
                               str(tmp_path_factory.mktemp('fresh') / 'run'))
    return runs[key]
  return run


def _copy(first, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(first[0], workdir)
  return workdir


def test_downstream_change_reuses_upstream_bitwise(first, tmp_path):
  workdir = _copy(first, tmp_path)
  results = _run(workdir, head__epochs=3)
  stages = _stages(workdir)
  assert stages['teacher'] == first[2]['teacher']
  assert stages['students'] == first[2]['students']
  assert stages['head'] != first[2]['head']
  assert results['digests']['teacher'] == first[1]['digests']['teacher']
  assert results['stage_keys']['students'] == first[1]['stage_keys'][
      'students']
  assert results['stage_keys']['head'] != first[1]['stage_keys']['head']
  # The students' outputs are the same, so the head starts from the same
  # test accuracy before fine-tuning.
  assert (results['tcn_test_acc_before_finetune']
          == first[1]['tcn_test_acc_before_finetune'])
  assert results['train_seconds']['teacher'] == first[1]['train_seconds'][
      'teacher']   # Restored from its checkpoint record, not retrained.


@pytest.mark.slow
@pytest.mark.parametrize('field,value', [('teacher__epochs', 3),
                                         ('seed', 1)])
def test_upstream_change_retrains_everything_downstream(first, fresh, tmp_path,
                                                        field, value):
  workdir = _copy(first, tmp_path)
  results = _run(workdir, **{field: value})
  stages = _stages(workdir)
  for stage in ('teacher', 'students', 'head'):
    assert stages[stage] != first[2][stage], stage
    assert (results['stage_keys'][stage] != first[1]['stage_keys'][stage])
  assert results['digests']['teacher'] != first[1]['digests']['teacher']
  assert results['digests']['tcn'] != first[1]['digests']['tcn']
  # The recomputed run equals a fresh run of the changed config.
  again = fresh(**{field: value})
  assert results['digests'] == again['digests']
  assert (results['tcn_test_acc_after_finetune']
          == again['tcn_test_acc_after_finetune'])


@pytest.mark.slow
def test_interrupted_head_then_new_seed_retrains_all(first, fresh, tmp_path):
  """The head stage half done, then another seed: nothing of seed 0 stays
  (the provenance in results.json is true)."""
  workdir = _copy(first, tmp_path)
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(workdir, 'head', '2'))   # Epoch 1 of 2 left.
  os.remove(os.path.join(workdir, 'results.json'))
  results = _run(workdir, seed=1)
  assert results['seed'] == 1
  assert results['digests'] == fresh(seed=1)['digests']


def test_changed_config_refused_without_allow(first, tmp_path):
  workdir = _copy(first, tmp_path)
  before = {s: _fingerprint(os.path.join(workdir, s))
            for s in ('teacher', 'students', 'head', 'tcn')}
  with open(os.path.join(workdir, 'config.json'), 'rb') as f:
    config_json = f.read()
  with pytest.raises(TCNError, match=r'teacher\.epochs: 2 -> 3'):
    pipeline.run(tiny_config(teacher__epochs=3), workdir)
  assert before == {s: _fingerprint(os.path.join(workdir, s))
                    for s in before}
  with open(os.path.join(workdir, 'config.json'), 'rb') as f:
    assert f.read() == config_json


def test_config_json_is_resolved(first):
  with open(os.path.join(first[0], 'config.json')) as f:
    config = json.load(f)
  text = json.dumps(config)
  assert '_by_n' not in text
  assert config['head']['epochs'] == 2 and config['head']['dropout'] == 0.5
  assert config['head']['optimizer'] == 'adam'
  assert config['students']['arch'] == 'C4 MP F D8r'
  assert config['students']['loss'] == 'mse'


@pytest.mark.slow
def test_teacher_init_from_workdir(first, tmp_path):
  """teacher.init_from: a finished run's teacher is used, not trained, and
  the run equals the one that trained it (same teacher, same students)."""
  results = pipeline.run(tiny_config(teacher__init_from=first[0]),
                         str(tmp_path / 'reuse'))
  assert results['digests'] == first[1]['digests']
  assert results['train_seconds']['teacher'] == 0.0
  assert not os.path.exists(tmp_path / 'reuse' / 'teacher')
  # Its teacher/ directory (a checkpoint) works too.
  again = pipeline.run(
      tiny_config(teacher__init_from=os.path.join(first[0], 'teacher')),
      str(tmp_path / 'reuse2'))
  assert again['digests'] == first[1]['digests']


def test_teacher_init_from_errors(first, tmp_path):
  with pytest.raises(TCNError, match='another architecture'):
    pipeline.run(tiny_config(teacher__init_from=first[0],
                             teacher__body='C8 MP F D64r D16r'),
                 str(tmp_path / 'a'))
  with pytest.raises(TCNError, match='holds no teacher checkpoint'):
    pipeline.run(tiny_config(teacher__init_from=str(tmp_path)),
                 str(tmp_path / 'b'))
  assert not os.path.exists(tmp_path / 'a')
  assert not os.path.exists(tmp_path / 'b')
