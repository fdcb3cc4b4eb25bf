"""Configs: paper architectures per n, and a run of the MNIST config on
TFDS mock data (the real MNIST is not installed here)."""
import importlib

import jax
import pytest

from tcn_jax import chunking
from tcn_jax import config as config_lib
from tcn_jax import models
from tcn_jax import presets
from tcn_jax import students
from tcn_jax import workdir
from tcn_jax.errors import TCNError

# Per-student parameter counts of the authors' FF students (reference Sec. 3).
PAPER_STUDENT_PARAMS = {
    'fashion_mnist': {1: 49_600, 2: 22_800, 4: 21_712, 8: 21_168},
    'mnist': {1: 77_840, 2: 40_016, 4: 19_144, 8: 10_620},
}


@pytest.mark.parametrize('name', sorted(PAPER_STUDENT_PARAMS))
@pytest.mark.parametrize('n', [1, 2, 4, 8])
def test_paper_students_per_n(name, n):
  config = importlib.import_module(name).get_config()
  config.num_students = n
  resolved = config_lib.resolve(config)
  spec = resolved.students.arch
  width = chunking.chunk_sizes(256, n)[0]
  model = models.student(spec, width, init=config.students.init)
  params = model.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))
  assert models.num_params(params) == PAPER_STUDENT_PARAMS[name][n]
  for field in ('epochs', 'dropout', 'optimizer'):
    assert resolved.head[field] not in ('', -1, -1.0)


def test_unset_value_without_paper_entry_is_refused():
  config = importlib.import_module('fashion_mnist').get_config()
  config.num_students = 3
  with pytest.raises(TCNError,
                     match='no arch for num_students=3: set --config.students.arch'):
    config_lib.resolve(config)
  config.students.arch = 'C8 MP F D16r'
  # The set value is taken: an unset head field without a value for n is
  # refused next.
  with pytest.raises(TCNError, match=r'no (epochs|optimizer|dropout) for '
                     r'num_students=3: set --config\.head\.'):
    config_lib.resolve(config)
  config.head.epochs, config.head.dropout, config.head.optimizer = 3, 0.5, 'adam'
  assert config_lib.resolve(config).students.arch == 'C8 MP F D16r'


def test_heterogeneous_students_group_and_keep_chunk_order():
  """'|'-separated architectures: identical students share a program, and
  the assembled outputs are each student's own output in chunk order."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tcn_jax import assemble  # pylint: disable=g-import-not-at-top
  config = importlib.import_module('fashion_mnist').get_config()
  config.num_students = 3
  config.head.epochs, config.head.dropout, config.head.optimizer = 3, 0.5, 'adam'
  config.students.arch = 'C4 MP F D8r | C8 MP F | C4 MP F D8r'
  specs = config_lib.student_specs(config_lib.resolve(config))
  assert specs == ['C4 MP F D8r', 'C8 MP F', 'C4 MP F D8r']
  rng = np.random.default_rng(0)
  x = rng.random((6, 10, 10, 1), np.float32)
  feats = rng.random((6, 7), np.float32)       # widths 3, 2, 2
  groups, _ = students.train_students(specs, x, feats, 3, epochs=0)
  assert [(g.member_ids, g.out_dim) for g in groups] == [([0], 3), ([1], 2),
                                                           ([2], 2)]
  tcn = assemble.TCN(groups, 10, 0.5)
  got = assemble.student_outputs_fn(tcn)([g.variables for g in groups], x)
  want = np.concatenate([
      g.model().apply(jax.tree_util.tree_map(lambda a: a[0], g.variables), x)
      for g in groups], axis=-1)
  np.testing.assert_allclose(got, want, atol=1e-6)
  config.students.arch = 'C4 MP F | C8 MP F'
  with pytest.raises(TCNError, match='2 architectures'):
    config_lib.student_specs(config)
  with pytest.raises(TCNError, match='2 architectures'):
    config_lib.resolve(config)


def test_cosine_student_schedule_starts_at_the_base_rate():
  """lr_schedule='cosine' takes its first step at the base learning rate
  (one step: same students as 'constant') and then decays (three: not)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.random((8, 10, 10, 1), np.float32)
  feats = rng.random((8, 4), np.float32)

  def params(schedule, epochs):
    groups, _ = students.train_students('C4 MP F', x, feats, 2,
                                        epochs=epochs, batch_size=8,
                                        optimizer=students.Optimizer(
                                            schedule=schedule))
    return jax.tree_util.tree_leaves(groups[0].variables)

  for a, b in zip(params('constant', 1), params('cosine', 1)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in
             zip(params('constant', 3), params('cosine', 3)))


def test_presets_tuned_and_improved():
  """'tuned' switches on the non-paper levers; 'improved' gives the paper's
  Table 4 students (s1 identical, s2-s4 larger) and only for Fashion-MNIST."""
  fm = importlib.import_module('fashion_mnist')
  c = fm.get_config('tuned')
  assert (c.students.logit_weight, c.students.lr_schedule) == (1.0, 'cosine')
  c = fm.get_config('improved')
  specs = config_lib.student_specs(config_lib.resolve(c))
  assert c.num_students == 4 and specs[0] == config_lib.STUDENTS_FMNIST['4']
  assert len(set(specs[1:])) == 1 and specs[1] != specs[0]
  with pytest.raises(ValueError, match='fashion_mnist only'):
    importlib.import_module('cifar10').get_config('improved')


def test_preset_bn_adds_batchnorm_before_each_relu():
  """'bn' keeps the paper's students and adds BatchNorm before each ReLU:
  2 parameters (scale, bias) per channel more, and batch statistics that
  training updates."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  fm = importlib.import_module('fashion_mnist')
  assert presets.with_batchnorm('C32 C16lin MP F D64r D8') == (
      'C32lin BN R C16lin MP F D64 BN R D8')
  c = fm.get_config('bn')
  spec = config_lib.student_specs(config_lib.resolve(c))[0]
  plain = config_lib.STUDENTS_FMNIST['4']
  assert spec.count('BN') == plain.count('C') + plain.count('r ')
  x = np.zeros((1, 28, 28, 1), np.float32)
  count = lambda s: models.num_params(
      models.student(s, 64).init(jax.random.key(0), x)['params'])
  assert count(spec) - count(plain) == 2 * (32 + 32 + 16 + 16 + 16)
  assert 'D128 BN R' in config_lib.student_specs(
      config_lib.resolve(fm.get_config('improved,bn')))[1]
  rng = np.random.default_rng(0)
  xs = rng.random((16, 10, 10, 1), np.float32)
  groups, _ = students.train_students(presets.with_batchnorm('C4 MP F'), xs,
                                      rng.random((16, 4), np.float32), 2,
                                      epochs=1, batch_size=8)
  stats = jax.tree_util.tree_leaves_with_path(
      groups[0].variables['batch_stats'])
  means = [a for path, a in stats if 'mean' in jax.tree_util.keystr(path)]
  assert means and all(np.any(a != 0) for a in means)   # Initially zeros.


def test_preset_flip_sets_only_the_augmentation():
  """'flip' turns on the mirrored-image augmentation and nothing else; any
  dataset config takes it (text data fails once loaded, naming the field)."""
  fm = importlib.import_module('fashion_mnist')
  base, flip = fm.get_config(), fm.get_config('flip')
  assert (base.data.augment, flip.data.augment) == ('', 'mirror')
  assert workdir.diff(base.to_dict(), flip.to_dict()) == [
      "data.augment: '' -> 'mirror'"]
  assert workdir.diff(config_lib.to_json(config_lib.resolve(base)),
                      config_lib.to_json(config_lib.resolve(flip))) == [
      "data.augment: '' -> 'mirror'"]
  assert importlib.import_module('cifar10').get_config(
      'flip').data.augment == 'mirror'


def test_preset_wide_keeps_the_parameter_budget():
  """'wide' widens the n >= 2 students' 16-unit bottleneck to 48 units at
  about the paper's parameters per student (within 13%); n = 1 is kept."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  fm = importlib.import_module('fashion_mnist')
  x = np.zeros((1, 28, 28, 1), np.float32)
  for n in (1, 2, 4, 8):
    c = fm.get_config('wide')
    c.num_students = n
    spec = config_lib.student_specs(config_lib.resolve(c))[0]
    width = chunking.chunk_sizes(256, n)[0]
    got = models.num_params(
        models.student(spec, width).init(jax.random.key(0), x)['params'])
    paper = PAPER_STUDENT_PARAMS['fashion_mnist'][n]
    if n == 1:
      assert spec == config_lib.STUDENTS_FMNIST['1'] and got == paper
    else:
      assert 'D48r' in spec and 'D16r' not in spec
      assert abs(got - paper) <= 0.13 * paper, (n, got, paper)
  with pytest.raises(ValueError, match='fashion_mnist only'):
    importlib.import_module('mnist').get_config('wide')


def test_preset_slim_fits_eight_students_in_100k():
  """'slim' shrinks only the n = 8 students, so that eight of them, with
  BatchNorm too, stay within the stretch target's 100k parameters."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  fm = importlib.import_module('fashion_mnist')
  x = np.zeros((1, 28, 28, 1), np.float32)
  for preset in ('slim', 'tuned,slim,bn'):
    c = fm.get_config(preset)
    c.num_students = 8
    total = sum(
        models.num_params(models.student(spec, width).init(
            jax.random.key(0), x)['params'])
        for spec, width in zip(
            config_lib.student_specs(config_lib.resolve(c)),
            chunking.chunk_sizes(256, 8)))
    assert 90_000 < total <= 100_000, (preset, total)
  assert PAPER_STUDENT_PARAMS['fashion_mnist'][8] * 8 > 100_000
  slim = fm.get_config('slim').students.arch_by_n
  assert {k: v for k, v in slim.items() if k != '8'} == {
      k: v for k, v in config_lib.STUDENTS_FMNIST.items() if k != '8'}
  with pytest.raises(ValueError, match='fashion_mnist only'):
    importlib.import_module('mnist').get_config('slim')
