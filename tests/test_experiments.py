"""The experiments' own tests live beside them, in experiments/tests/; this
module collects them into the suite, so that the README's test command
(`python -m pytest tests`) runs them too. Run them alone with
`python -m pytest experiments/tests`."""
import contextlib
import importlib.util

import pytest

from helpers import ROOT

with contextlib.ExitStack() as _stack:
  if importlib.util.find_spec('experiments') is None:   # Not installed.
    _stack.enter_context(pytest.MonkeyPatch.context()).syspath_prepend(ROOT)
  from experiments.tests.test_consistent import *  # pylint: disable=wildcard-import,unused-wildcard-import  # noqa: F401,F403
  from experiments.tests.test_grid_launcher import *  # pylint: disable=wildcard-import,unused-wildcard-import  # noqa: F401,F403
  from experiments.tests.test_tables import *  # pylint: disable=wildcard-import,unused-wildcard-import  # noqa: F401,F403


# Here rather than in experiments/tests: it needs the suite's shared smoke
# run (conftest.py).
@pytest.mark.slow
def test_regression_mse_is_the_students_validation_mse(smoke_run):
  """experiments.consistent_fmnist.regression_mse on the shared smoke run (2
  students, equal contiguous chunks): its validation MSE in feature space is
  the mean of the students' own last validation MSEs; its training MSE, on
  the run's cached training features, is of the same order."""
  from experiments import consistent_fmnist  # pylint: disable=g-import-not-at-top
  mse = consistent_fmnist.regression_mse(smoke_run.workdir, rows=1000)
  expected = sum(smoke_run.results['student_val_mse']) / 2
  assert abs(mse['val'] - expected) < 1e-4 * expected, (mse, expected)
  assert 0 < mse['train'] < 10 * mse['val']
