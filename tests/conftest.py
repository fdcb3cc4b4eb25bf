"""Shared fixtures: a tiny real-data config and the repository root."""
import os
import sys

import jax
import pytest

# Equivalence tests compare float32 results across code paths; accelerators
# default to reduced-precision (TF32) matmuls and convolutions.
jax.config.update('jax_default_matmul_precision', 'highest')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'configs'))

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST_DIR),
    reason='needs apt-get install -y dataset-fashion-mnist')


@pytest.fixture
def smoke_config():
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  return fashion_mnist.get_config('smoke')
