"""The preset registry: every preset resolves, the README's presets table
lists exactly the registry (with its in-the-paper column), ':best' keeps
the budget the README promises (n >= 2, <= 100k student parameters), and
':consistent''s students fill it without dropout at n = 2, 4, 8."""
import os
import re

import jax
import numpy as np
import pytest

from helpers import ROOT
from tcn_jax import chunking
from tcn_jax import config as config_lib
from tcn_jax import models
from tcn_jax import presets


def _readme_presets():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  rows = re.findall(r'^\| `(\w+)` \| .* \| (yes|no) \|$', text, re.M)
  return dict(rows)


def test_readme_lists_every_preset():
  table = _readme_presets()
  assert set(table) == set(presets.PRESETS.names())
  for name, in_paper in table.items():
    assert presets.PRESETS.get(name).in_paper == (in_paper == 'yes'), name


@pytest.mark.parametrize('name', presets.PRESETS.names())
def test_every_preset_resolves(name):
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  c = config_lib.resolve(fashion_mnist.get_config(name))
  assert '_by_n' not in str(config_lib.to_json(c))


def test_unknown_and_foreign_presets_fail():
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  import mnist  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="unknown preset 'bogus'"):
    fashion_mnist.get_config('bogus')
  with pytest.raises(ValueError, match='fashion_mnist only'):
    mnist.get_config('best')


def test_smoke_applies_last():
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  a, b = fashion_mnist.get_config('smoke,gan'), fashion_mnist.get_config(
      'gan,smoke')
  assert a.to_dict() == b.to_dict() and a.students.epochs == 4


def _student_params(c):
  widths = chunking.chunk_sizes(256, c.num_students)
  total = 0
  for spec, width in zip(config_lib.student_specs(c), widths):
    net = models.student(spec, width, c.students.out_relu, c.students.init)
    variables = jax.eval_shape(
        lambda net=net: net.init(jax.random.key(0),
                                 np.zeros((1, 28, 28, 1), np.float32)))
    total += models.num_params(variables['params'])
  return total


def test_best_keeps_its_budget():
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  c = config_lib.resolve(fashion_mnist.get_config('best'))
  assert c.num_students >= 2 and c.chunking == 'pca'
  assert _student_params(c) <= 100_000


@pytest.mark.parametrize('n', [2, 4, 8])
def test_consistent_students_fill_the_budget_without_dropout(n):
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  c = fashion_mnist.get_config('consistent')
  c.num_students = n
  c = config_lib.resolve(c)
  assert 'Do' not in c.students.arch
  # Within 100k in all, and at least 90k of it used.
  assert 90_000 <= _student_params(c) <= 100_000
