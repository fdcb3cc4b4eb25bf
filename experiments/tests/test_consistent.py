"""experiments.consistent_fmnist: its commands and its report (the head
chosen on validation, its test accuracy reported)."""
import json
import os

import numpy as np
import pytest

from experiments import consistent_fmnist
from tcn_jax import checkpoint


def _results(val_before, val_after, test_before, test_after):
  return {'num_students': 2, 'params': {'students_total': 51904},
          'teacher_test_acc': 0.9239,
          'tcn_val_acc_before_finetune': val_before,
          'tcn_val_acc_after_finetune': val_after,
          'tcn_test_acc_before_finetune': test_before,
          'tcn_test_acc_after_finetune': test_after,
          'train_seconds': {'students': 100.0},
          'students_curve': [{'epoch': 1, 'seconds': 50.0,
                              'tcn_val_acc': 0.8, 'tcn_test_acc': 0.79},
                             {'epoch': 2, 'seconds': 100.0,
                              'tcn_val_acc': val_before,
                              'tcn_test_acc': test_before}],
          'digests': {'teacher': 't', 'tcn': 'x'}}


def test_report_chooses_the_head_on_validation(tmp_path, monkeypatch):
  caches = []   # Every run's MSE reads the datasets loaded once.
  monkeypatch.setattr(consistent_fmnist, 'regression_mse',
                      lambda workdir, datasets: caches.append(id(datasets))
                      or {'train': 0.1, 'val': 0.25})
  root = tmp_path / 'runs'
  for name, r in (('best_s0', _results(0.90, 0.91, 0.905, 0.902)),
                  ('consistent_s0', _results(0.93, 0.92, 0.921, 0.925))):
    os.makedirs(root / name)
    (root / name / 'results.json').write_text(json.dumps(r))
  os.makedirs(root / 'consistent_s1')   # Not started: left out.
  with checkpoint.StageCheckpoint(   # Students training: its curve so far.
      str(root / 'consistent_n4_s0' / 'students' / 'group0')) as ckpt:
    ckpt.save(1, {'w': np.zeros(2, np.float32)}, {'history': [
        {'epoch': 1, 'train_loss': [1.0], 'tcn_val_acc': 0.5,
         'tcn_test_acc': 0.25}]})
  out = str(tmp_path / 'report')
  consistent_fmnist.report(str(root), out)
  report = json.load(open(out + '.json'))
  runs = report['runs']
  assert set(runs) == {'best_s0', 'consistent_s0'}
  assert report['unfinished'] == {'consistent_n4_s0': [
      {'epoch': 1, 'tcn_val_acc': 0.5, 'tcn_test_acc': 0.25}]}
  assert runs['best_s0']['head'] == 'fine-tuned'
  assert runs['best_s0']['test_acc'] == 0.902   # Fine-tuned: val says so.
  assert runs['consistent_s0']['head'].startswith('frozen')
  assert runs['consistent_s0']['test_acc'] == 0.921
  assert runs['consistent_s0']['student_seconds_per_epoch'] == 50.0
  text = open(out + '.md').read()
  assert '| consistent_s0 | 2 | 51,904 |' in text and '2: 93.00 / 92.10' in text
  assert runs['best_s0']['feature_mse'] == {'train': 0.1, 'val': 0.25}
  assert len(caches) == 2 and len(set(caches)) == 1
  assert '| 0.100 / 0.250 |' in text
  assert '| 93.00 / 92.00 | 92.39 |' in text   # Val by head, teacher test.
  assert '- consistent_n4_s0 (unfinished): 1: 50.00 / 25.00' in text
  assert os.path.getsize(out + '.png') > 0 and '](report.png)' in text
  # Again: each run's feature MSE is the last report's while its digests
  # stay; a rerun run (other digests) is scored anew.
  r = _results(0.93, 0.92, 0.921, 0.925)
  r['digests'] = {'teacher': 't', 'tcn': 'other'}
  (root / 'consistent_s0' / 'results.json').write_text(json.dumps(r))
  consistent_fmnist.report(str(root), out)
  assert len(caches) == 3


def test_commands_take_the_teacher_and_score_each_epoch():
  cmd = consistent_fmnist.command('consistent_n8_s1', '/t', '/r')
  assert any(a.endswith('fashion_mnist.py:consistent') for a in cmd)
  assert '--config.num_students=8' in cmd and '--config.seed=1' in cmd
  assert '--config.teacher.init_from=/t' in cmd
  assert '--config.students.eval_tcn=True' in cmd
  assert '--workdir=/r/consistent_n8_s1' in cmd


def test_a_head_only_recipe_starts_from_its_source_run(tmp_path):
  """consistent_crops_headviews_s1 copies consistent_crops_s1 (not its
  head or results) and may change the config (the head's): the students
  are the source run's."""
  source = tmp_path / 'consistent_crops_s1'
  for sub in ('students/group0', 'head'):
    os.makedirs(source / sub)
  (source / 'results.json').write_text('{}')
  (source / 'features.npz').write_text('f')
  consistent_fmnist.prepare('consistent_crops_headviews_s1', str(tmp_path))
  copy = tmp_path / 'consistent_crops_headviews_s1'
  assert sorted(os.listdir(copy)) == ['features.npz', 'students']
  cmd = consistent_fmnist.command('consistent_crops_headviews_s1', '/t',
                                  str(tmp_path))
  assert '--config.head.views=pad_crop_flip_mixup' in cmd
  assert '--config.allow_config_change=True' in cmd
  consistent_fmnist.prepare('consistent_crops_s1', str(tmp_path))  # Not one.
  with pytest.raises(SystemExit, match='consistent_crops_s0'):
    consistent_fmnist.prepare('consistent_crops_headviews_s0', str(tmp_path))
