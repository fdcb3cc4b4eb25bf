"""The 'sharded' strategy (every local device on the mesh's 'students' axis,
through the one engine): members split over devices equal vmap / unrolled.

Several CPU devices need XLA_FLAGS set before jax is imported, so the
multi-device checks run in a subprocess with 4 host devices.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import forced_devices_env
from helpers import needs_fmnist
from helpers import ROOT
from helpers import SMOKE
from helpers import TINY_FLAGS
from tcn_jax import engine
from tcn_jax import mesh as mesh_lib
from tcn_jax import models
from test_engine import SPEC
from test_engine import train_group



def apply_group(ids, strategy, outer_jit=False):
  model = models.student(SPEC, 5, impl='im2col')
  x = np.random.default_rng(1).random((6, 12, 12, 1), np.float32)
  params = engine.init_group(lambda k: model.init(k, x[:1])['params'], 0, ids)
  fn = lambda p, xb: model.apply({'params': p}, xb)
  apply = engine.make_apply_fn(fn, len(ids), strategy)
  return np.asarray((jax.jit(apply) if outer_jit else apply)(params, x))


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
             for u, v in zip(jax.tree_util.tree_leaves(a),
                             jax.tree_util.tree_leaves(b)))


def _worker():
  """Runs in the 4-device subprocess; prints one JSON line of results."""
  jax.config.update('jax_default_matmul_precision', 'highest')
  out = {'devices': jax.local_device_count()}
  for n in (4, 3, 5):
    ids = list(range(n))
    sharded, sharded_losses = train_group(ids, 'sharded')
    leaf = jax.tree_util.tree_leaves(sharded)[0]
    layout = mesh_lib.Layout(engine.group_mesh('sharded'), n, 32)
    row = {'mesh': layout.mesh.size, 'padded': layout.padded,
           'shape': leaf.shape[0],
           'result_devices': len(leaf.sharding.device_set)}
    for other in ('vmap', 'unrolled') if n < 5 else ('vmap',):
      params, losses = train_group(ids, other)
      row[other] = _max_diff(sharded, params)
      row[other + '_loss'] = float(np.max(np.abs(sharded_losses - losses)))
    want = apply_group(ids, 'vmap')
    row['apply'] = float(np.max(np.abs(apply_group(ids, 'sharded') - want)))
    # Inside another jit the sharded apply runs as vmap on that jit's device.
    row['apply_in_jit'] = float(np.max(np.abs(
        apply_group(ids, 'sharded', outer_jit=True) - want)))
    out[str(n)] = row
  print('RESULT ' + json.dumps(out))


def _run_four_devices(args, timeout=300, **kw):
  env = forced_devices_env(4)
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False, **kw)


@pytest.mark.slow
def test_sharded_equals_vmap_and_unrolled_on_four_devices():
  proc = _run_four_devices([
      sys.executable, '-c',
      'import sys; sys.path[:0] = ["tests", "."]; '
      'import test_sharded; test_sharded._worker()'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  out = json.loads(line[len('RESULT '):])
  assert out['devices'] == 4
  # Members are padded to a multiple of the 4 devices with dummies (copies
  # of member 0) that are dropped: n=3 -> 4, n=5 -> 8.
  assert (out['4']['mesh'], out['4']['padded']) == (4, 4)
  assert (out['3']['mesh'], out['3']['padded']) == (4, 4)
  assert (out['5']['mesh'], out['5']['padded']) == (4, 8)
  for n in ('4', '3', '5'):
    # Results come back unpadded: split over the devices where the members
    # divide them, else replicated (every device holds the whole state).
    assert out[n]['shape'] == int(n)
    assert out[n]['result_devices'] == 4
    for key, diff in out[n].items():
      if key.startswith(('vmap', 'unrolled', 'apply')):
        assert diff < 1e-6, (n, key, out[n])


def test_sharded_on_one_device_is_vmap():
  if jax.local_device_count() != 1:
    pytest.skip('needs a single device')
  a, la = train_group([0, 1, 2], 'sharded')
  b, lb = train_group([0, 1, 2], 'vmap')
  assert _max_diff(a, b) == 0 and np.array_equal(la, lb)
  np.testing.assert_array_equal(apply_group([0, 1], 'sharded'),
                                apply_group([0, 1], 'vmap'))


@pytest.mark.slow
@needs_fmnist
def test_cli_with_sharded_students(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = _run_four_devices([
      sys.executable, '-m', 'tcn_jax.main', f'--config={SMOKE}',
      f'--workdir={workdir}', *TINY_FLAGS, '--config.num_students=3',
      '--config.head.optimizer=adam', '--config.head.dropout=0.5',
      '--config.students.strategy=sharded'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert results['num_students'] == 3
  assert all(np.isfinite(results['student_val_mse']))
  from tcn_jax import assemble  # pylint: disable=g-import-not-at-top
  predict, tcn = assemble.load_tcn(os.path.join(workdir, 'tcn'))
  assert tcn.num_students == 3
  logits = np.asarray(predict(np.zeros((2, 28, 28, 1), np.float32)))
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
