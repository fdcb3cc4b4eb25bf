"""Training progress: a live bar (notebooks), log lines (command line) or
nothing, chosen by `tcn.set_progress`; never a change in the results."""
import logging

import jax
import numpy as np
import pytest

import tcn_jax as tcn
from helpers import needs_fmnist
from tcn_jax import metrics


@pytest.fixture(autouse=True)
def restore_mode():
  before = tcn.set_progress('auto')
  yield
  tcn.set_progress(before)


def test_bad_mode_is_one_error_naming_the_choices():
  with pytest.raises(tcn.TCNError, match=r"'fancy'.*'auto', 'bar', 'log'"):
    tcn.set_progress('fancy')
  assert tcn.set_progress('none') == 'auto'   # Unchanged by the bad call.


def test_bar_counts_steps_with_loss_and_resumes_mid_stage(capsys):
  tcn.set_progress('bar')
  progress = metrics.Progress('teacher', 3, 1, steps_per_epoch=10)
  assert capsys.readouterr().err.count('10/30')   # Resumed after epoch 1.
  progress.epoch(2, {'loss': 0.5, 'val': 0.25})
  progress.epoch(3, {'loss': 0.125, 'val': 0.5})
  err = capsys.readouterr().err
  assert 'teacher: 100%' in err and '30/30' in err
  assert 'loss=0.1250' in err and 'val=0.5000' in err and 'epoch=3/3' in err
  assert progress.bar.disable or progress.bar.n == 30


@pytest.mark.parametrize('mode, lines', [('log', 2), ('auto', 2), ('none', 0)])
def test_log_lines_outside_notebooks(mode, lines, caplog, capsys):
  """'auto' outside a Jupyter kernel (here, a terminal) logs like 'log'."""
  tcn.set_progress(mode)
  assert not metrics.in_notebook()
  with caplog.at_level(logging.INFO, logger='absl'):
    progress = metrics.Progress('head', 2, 0, steps_per_epoch=4)
    progress.epoch(1, {'loss': 1.0})
    progress.epoch(2, {'loss': 0.5})
  got = [r.getMessage() for r in caplog.records if '[head] epoch' in r.message]
  assert len(got) == lines
  if lines:
    assert got[-1].startswith('[head] epoch 2/2 loss=0.5000')
  assert capsys.readouterr().err == ''   # No bar.


@needs_fmnist
def test_results_do_not_depend_on_the_progress_mode(capsys):
  ds = tcn.load_dataset('fashion_mnist', train_size=200, test_size=100)
  teacher = tcn.Teacher('F D16r', num_classes=10)
  out = {}
  for mode in ('none', 'bar'):
    tcn.set_progress(mode)
    out[mode], _ = tcn.train_teacher(teacher, ds, epochs=1, batch_size=100)
  assert 'teacher: 100%' in capsys.readouterr().err
  for a, b in zip(*map(jax.tree_util.tree_leaves, out.values())):
    np.testing.assert_array_equal(a, b)
