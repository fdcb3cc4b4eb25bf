"""The library's structure: configs are plain data (no Orbax, no Grain),
`config.upgrade` reads old config.json files, the import graph of tcn_jax
has no cycle (imports inside functions counted), the registries by name."""
import ast
import copy
import json
import os
import subprocess
import sys

import numpy as np
import optax
import pytest

from tcn_jax import augment
from tcn_jax import config as config_lib
from tcn_jax import optim
from tcn_jax import presets
from tcn_jax import workdir as workdir_lib
from tcn_jax.errors import TCNError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs'))
                 if f.endswith('.py'))
PACKAGE = os.path.join(ROOT, 'tcn_jax')


def test_configs_and_presets_import_no_orbax_and_no_grain():
  """Loading and resolving every configs/*.py with every preset it takes
  (in a fresh process) imports neither Orbax nor Grain."""
  script = f'''
import json, sys
sys.path.insert(0, {os.path.join(ROOT, 'configs')!r})
from tcn_jax import config, presets
loaded = []
for name in {CONFIGS!r}:
  module = __import__(name)
  for preset in ('',) + presets.PRESETS.names():
    try:
      c = module.get_config(preset)
    except Exception:   # A preset this dataset does not take.
      continue
    loaded.append((name, preset))
    try:
      config.resolve(c)
    except config.TCNError:   # E.g. an image folder without data.dir.
      pass
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('orbax', 'grain'))
print(json.dumps({{'loaded': loaded, 'heavy': heavy}}))
'''
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  got = json.loads(out.strip().splitlines()[-1])
  assert got['heavy'] == []
  assert len(got['loaded']) >= 2 * len(CONFIGS)
  assert ['fashion_mnist', 'smoke'] in got['loaded']


def _module_of(path):
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
  return rel.removesuffix('.__init__')


def _imports(path):
  """The tcn_jax modules `path` imports, anywhere in it (functions too)."""
  module = _module_of(path)
  package = module if path.endswith('__init__.py') else module.rpartition(
      '.')[0]
  with open(path) as f:
    tree = ast.parse(f.read())
  modules = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      modules |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) -
                                           node.level + 1] + [base]).strip('.')
      modules.add(base)
      modules |= {f'{base}.{a.name}' for a in node.names}
    elif (isinstance(node, ast.Call) and getattr(node.func, 'attr', '') ==
          'import_module' and node.args and
          isinstance(node.args[0], ast.Constant)):
      modules.add(node.args[0].value)
  known = {_module_of(os.path.join(PACKAGE, f))
           for f in os.listdir(PACKAGE) if f.endswith('.py')}
  return {m for m in modules if m in known and m != module and
          m != 'tcn_jax'}


def test_import_graph_has_no_cycle():
  """No tcn_jax module imports (at module level or inside a function) a
  module that imports it back, directly or through others."""
  graph = {_module_of(os.path.join(PACKAGE, f)):
           _imports(os.path.join(PACKAGE, f))
           for f in os.listdir(PACKAGE) if f.endswith('.py')}
  graph.pop('tcn_jax')   # The package's lazy API names everything.
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 'open':
        cycle = stack[stack.index(n):] + [n]
        pytest.fail('import cycle: ' + ' -> '.join(cycle))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert 'tcn_jax.input_pipeline' not in graph['tcn_jax.data']
  assert 'tcn_jax.data' in graph['tcn_jax.input_pipeline']


def _old_config_json():
  """A config.json as a version before today's fields wrote it."""
  new = config_lib.to_json(config_lib.resolve(config_lib.base_config()))
  old = copy.deepcopy(new)
  for section, field in (('teacher', 'init_from'), ('students', 'features'),
                         ('students', 'loss'), ('data', 'augment'),
                         ('data', 'image_size'), ('data', 'streaming'),
                         ('data', 'memory_limit_mb'), ('data', 'layout')):
    del old[section][field]
  for field in ('forward_impl', 'dtype', 'export', 'mesh'):
    del old[field]
  old['students']['augment'] = ''
  return old, new


def test_upgrade_reads_an_old_config_json_as_todays():
  old, new = _old_config_json()
  assert config_lib.upgrade(old) == new
  assert workdir_lib.diff(config_lib.upgrade(old), new) == []
  assert config_lib.upgrade(new) == new   # Today's config is unchanged.
  as_config = config_lib.upgrade(config_lib.resolve(config_lib.base_config()))
  assert config_lib.to_json(as_config) == new   # A ConfigDict in, one out.


def test_upgrade_maps_the_students_augmentation_and_old_defaults():
  old, new = _old_config_json()
  old['students']['augment'] = 'flip'
  up = config_lib.upgrade(old)
  assert up['data']['augment'] == 'mirror' and 'augment' not in up['students']
  old['students']['logit_weight'] = 1.0   # loss '' chose logit matching.
  assert config_lib.upgrade(old)['students']['loss'] == 'logit_matching'
  old['data']['augment'] = 'flip'
  with pytest.raises(TCNError, match='set only config.data.augment'):
    config_lib.upgrade(old)
  folder, _ = _old_config_json()
  folder['data']['name'] = 'image_folder'
  assert config_lib.upgrade(folder)['data']['image_size'] == 32
  assert config_lib.upgrade(_old_config_json()[0])['data']['image_size'] == 224


def test_every_field_is_in_base_config():
  """The resolved config of every config file has no field that
  base_config lacks (so nothing reads a field with a default)."""
  base = config_lib.to_json(config_lib.base_config())

  def fields(d, prefix=''):
    for k, v in d.items():
      if k.endswith('_by_n'):   # Per-n tables of the config files.
        continue
      if isinstance(v, dict):
        yield from fields(v, f'{prefix}{k}.')
      else:
        yield prefix + k
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  try:
    for name in CONFIGS:
      c = config_lib.to_json(__import__(name).get_config('smoke'))
      assert set(fields(c)) <= set(fields(base)), name
  finally:
    sys.path.remove(os.path.join(ROOT, 'configs'))


def test_schedules_are_the_optax_ones():
  """The schedule registry gives the numbers the stages had before."""
  assert optim.schedule('constant', 1e-3, steps_per_epoch=7) == 1e-3
  step = optim.schedule('step', 0.1, steps_per_epoch=10, step_epochs=3,
                        step_factor=0.5)
  before = optax.exponential_decay(0.1, 30, 0.5, staircase=True)
  cosine = optim.schedule('cosine', 1e-3, steps_per_epoch=10, epochs=4)
  cos_before = optax.cosine_decay_schedule(1e-3, 40)
  for t in (0, 29, 30, 61, 100):
    assert float(step(t)) == float(before(t))
    assert float(cosine(t)) == float(cos_before(t))
  with pytest.raises(TCNError, match="unknown learning-rate schedule 'x'"):
    optim.schedule('x', 1.0, steps_per_epoch=1)
  c = config_lib.base_config()
  c.students.lr_schedule = 'step'
  with pytest.raises(TCNError, match="'step' is the teacher's"):
    config_lib.resolve(c)


def test_augmentations_by_name():
  assert augment.AUGMENTATIONS.names() == (
      '', 'mirror', 'flip', 'crop_flip', 'pad_crop_flip', 'mixup',
      'pad_crop_flip_mixup')
  assert [n for n in augment.AUGMENTATIONS.names()
          if augment.get(n).on_device] == [
              '', 'flip', 'pad_crop_flip', 'mixup', 'pad_crop_flip_mixup']
  assert augment.get('mirror').mirrored_copies
  assert not augment.get('mirror').per_epoch
  assert augment.get('crop_flip').crop and augment.get('flip').per_epoch
  assert augment.key_name('mirror') == 'flip'   # Its key before the move.
  assert augment.key_name('crop_flip') == augment.key_name('') == ''
  x = np.arange(8, dtype=np.float32).reshape(1, 2, 4, 1)
  np.testing.assert_array_equal(augment.hflip(x)[0, :, :, 0],
                                x[0, :, ::-1, 0])
  assert presets.PRESETS.get('flip').changes.startswith('students also')


def test_public_api_is_grouped_and_lazy():
  """`import tcn_jax` imports no stage module; every name in __all__
  resolves; `tcn.export` stays the function."""
  script = '''
import sys, tcn_jax as tcn
light = sorted(m for m in sys.modules if m.startswith('tcn_jax.'))
names = {n: callable(getattr(tcn, n)) for n in tcn.__all__}
import tcn_jax.export
print(light, all(names.values()), tcn.export.__module__)
'''
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.strip()
  assert out.splitlines()[-1] == '[] True tcn_jax.export'
