"""Shared fixtures. What tests import (TINY, tiny_config, ROOT, ...) is in
helpers.py."""
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
