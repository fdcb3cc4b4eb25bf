"""Shared fixtures. What tests import (TINY, tiny_config, ROOT, ...) is in
helpers.py."""
import collections
import copy
import hashlib
import os

import jax
import pytest

# Equivalence tests compare float32 results across code paths; accelerators
# default to reduced-precision (TF32) matmuls and convolutions.
jax.config.update('jax_default_matmul_precision', 'highest')

from helpers import ROOT  # pylint: disable=g-import-not-at-top,unused-import


@pytest.fixture
def smoke_config():
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  return fashion_mnist.get_config('smoke')


TinyRun = collections.namedtuple('TinyRun', 'workdir results')


def _files(workdir):
  """{relative path: sha256} of every file under `workdir` but its lock."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if rel != 'lock':
        with open(path, 'rb') as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """A finished run of tiny_config(), built once per test session and shared:
  (workdir, results). Tests read it and never change it; one that needs to
  change a finished run copies the workdir first (shutil.copytree). At the
  end of the session the workdir and the results are checked unchanged."""
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from tcn_jax import pipeline  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('tiny_run') / 'run')
  results = pipeline.run(tiny_config(), workdir)
  files, kept = _files(workdir), copy.deepcopy(results)
  yield TinyRun(workdir, results)
  assert _files(workdir) == files, 'a test changed the shared tiny run'
  assert results == kept, "a test changed the shared tiny run's results"
