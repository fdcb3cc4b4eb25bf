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
