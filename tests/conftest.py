"""Shared fixtures. What tests import (TINY, tiny_config, ROOT, ...) is in
helpers.py."""
import collections
import copy
import hashlib
import os
import shutil
import tempfile

# One persistent XLA compilation cache per test session, set before JAX is
# imported so the CLI subprocesses inherit it too. The suite's many tiny runs
# compile the same programs over and over, and on a CPU compiling them is
# most of their time; a hit returns the very executable a compile would, so
# no result changes. The cache starts empty and is removed at the end. The
# suite's worker processes (pytest-xdist) share their controller's cache.
_XLA_CACHE = (os.environ.get('TCN_JAX_TEST_XLA_CACHE')
              or tempfile.mkdtemp(prefix='tcn_jax_test_xla_cache.'))
os.environ['TCN_JAX_TEST_XLA_CACHE'] = _XLA_CACHE
os.environ['JAX_COMPILATION_CACHE_DIR'] = _XLA_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
# The same reason: XLA:CPU's LLVM backend at optimization level 1, not 3,
# compiles the suite's small programs about a fifth faster and runs its
# larger ones as fast (measured on the tests' own runs). Every comparison a
# test makes is between programs compiled alike, so the suite's properties
# are the same; runs outside the tests keep XLA's default.
BACKEND_OPT_LEVEL = '--xla_backend_optimization_level=1'
os.environ['XLA_FLAGS'] = ' '.join(filter(None, [
    os.environ.get('XLA_FLAGS'), BACKEND_OPT_LEVEL]))

# The suite runs in two worker processes (pyproject.toml's addopts): on an
# accelerator each takes memory as it needs it, not most of it up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

jax.config.update('jax_compilation_cache_dir', _XLA_CACHE)

# Equivalence tests compare float32 results across code paths; accelerators
# default to reduced-precision (TF32) matmuls and convolutions.
jax.config.update('jax_default_matmul_precision', 'highest')

from helpers import ROOT  # pylint: disable=g-import-not-at-top,unused-import


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if 'PYTEST_XDIST_WORKER' not in os.environ:   # The controller, last.
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


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


def _shared_run(tmp_path_factory, name, config):
  """Runs `config` once into a fresh workdir, yields (workdir, results), and
  at the end of the session checks that no test changed either."""
  from tcn_jax import pipeline  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp(name) / 'run')
  results = pipeline.run(config, workdir)
  files, kept = _files(workdir), copy.deepcopy(results)
  yield workdir, results
  assert _files(workdir) == files, f'a test changed the shared {name}'
  assert results == kept, f"a test changed the shared {name}'s results"


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """A finished run of tiny_config(), built once per test session and shared:
  (workdir, results). Tests read it and never change it; one that needs to
  change a finished run copies the workdir first (shutil.copytree). At the
  end of the session the workdir and the results are checked unchanged."""
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  for workdir, results in _shared_run(tmp_path_factory, 'tiny_run',
                                      tiny_config()):
    yield TinyRun(workdir, results)


SmokeRun = collections.namedtuple('SmokeRun', 'config workdir results')


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """A finished run of the smoke preset on real Fashion-MNIST (3,000 train
  images, n = 2, with the KD and KDGAN baselines for 2 epochs), built once
  per session and shared like tiny_run: (config, workdir, results). A test
  that trains other students on its teacher starts from
  helpers.reuse_teacher."""
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config('smoke')
  config.num_students = 2
  config.kd.enabled = config.kdgan.enabled = True
  config.kd.epochs = config.kdgan.epochs = 2
  for workdir, results in _shared_run(tmp_path_factory, 'smoke_run', config):
    yield SmokeRun(config, workdir, results)
