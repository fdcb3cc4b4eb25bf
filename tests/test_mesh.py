"""One mesh for every stage: data-parallel single models and students over a
('data', 'students') mesh equal one device.

Several CPU devices need XLA_FLAGS before jax is imported, so the
multi-device checks run in one subprocess with 4 host devices.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import ROOT
from helpers import forced_devices_env
from helpers import needs_fmnist
from helpers import tiny_config
from tcn_jax import assemble
from tcn_jax import config as config_lib
from tcn_jax import engine
from tcn_jax import input_pipeline as ip
from tcn_jax import mesh as mesh_lib
from tcn_jax.errors import TCNError


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
             for u, v in zip(jax.tree_util.tree_leaves(a),
                             jax.tree_util.tree_leaves(b)))


def _students_data():
  rng = np.random.default_rng(0)
  x = rng.random((200, 12, 12, 1), np.float32)
  feats = np.maximum(rng.standard_normal((200, 16)), 0).astype(np.float32)
  return x, feats, (np.minimum(x[:40] + 0.1, 1), feats[:40])   # In [0, 1].


def _worker(out_dir):
  """Runs with 4 host devices; writes results.json to out_dir."""
  jax.config.update('jax_default_matmul_precision', 'highest')
  import tcn_jax as tcn  # pylint: disable=g-import-not-at-top
  out = {'devices': jax.device_count()}
  ds = tcn.load_dataset('fashion_mnist', train_size=300, test_size=100)
  teacher = tcn.Teacher('C4 MP F D32r D16r', num_classes=10)
  kw = dict(epochs=2, batch_size=64)
  one, one_info = tcn.train_teacher(teacher, ds, **kw)
  mesh = mesh_lib.make_mesh(data=-1)
  with mesh_lib.use(mesh):
    four, four_info = tcn.train_teacher(teacher, ds, **kw)
    out['teacher_batch_devices'] = mesh_lib.Layout(mesh, 1, 64).batch_devices
    feats_mesh = tcn.teacher_features(teacher, four, ds.val.x[:99], 50)
  out['teacher'] = _max_diff(one, four)
  out['teacher_loss'] = abs(one_info['history'][-1]['train_loss'][0]
                            - four_info['history'][-1]['train_loss'][0])
  out['features'] = _max_diff(
      tcn.teacher_features(teacher, four, ds.val.x[:99], 50), feats_mesh)
  # The head stage on the mesh: the frozen students' outputs and the head's
  # logits (test accuracy) data-parallel, the head trained by fit on it.
  train_feats = tcn.teacher_features(teacher, one, ds.train.x, 100)
  groups, _ = tcn.train_students('C4 MP F D8r', ds.train.x, train_feats, 2,
                                 epochs=1, batch_size=64)
  net = tcn.TCN(groups, 10, head_dropout=0.5,
                head_variables=tcn.teacher_head(one))
  outputs = assemble.student_outputs_fn(net)
  students = [g.variables for g in groups]
  head_kw = dict(epochs=1, batch_size=64, eval_batch_size=50)
  one_net, one_head = tcn.finetune_head(net, ds, **head_kw)
  one_out = ip.batched(mesh_lib.forward(outputs, students),
                           ds.test.x[:99], 50)
  one_acc = tcn.evaluate(mesh_lib.forward(teacher.apply, one), ds.test.x,
                         ds.test.y, 50)
  with mesh_lib.use(mesh):
    four_net, four_head = tcn.finetune_head(net, ds, **head_kw)
    four_out = ip.batched(mesh_lib.forward(outputs, students),
                              ds.test.x[:99], 50)
    four_acc = tcn.evaluate(mesh_lib.forward(teacher.apply, one), ds.test.x,
                            ds.test.y, 50)
  out['student_outputs'] = _max_diff(one_out, four_out)
  out['head'] = _max_diff(one_net.head_variables, four_net.head_variables)
  out['head_acc'] = [[one_head[k], four_head[k]]
                     for k in ('test_acc_before', 'test_acc_after')]
  out['teacher_acc'] = [one_acc, four_acc]
  # The head on views (head.views): the students' outputs of each batch's
  # view in the step, the batch (and mixup's partner images) split over
  # the data axis.
  views = dict(head_kw, views='pad_crop_flip_mixup')
  one_v = tcn.finetune_head(net, ds, **views)[0]
  with mesh_lib.use(mesh):
    four_v = tcn.finetune_head(net, ds, **views)[0]
  out['head_views'] = _max_diff(one_v.head_variables, four_v.head_variables)
  x, feats, val = _students_data()
  kw = dict(epochs=2, batch_size=50, seed=5, val=val,
            optimizer=tcn.students.Optimizer(learning_rate=1e-2))
  for n in (3,):   # 3: one dummy member pads the students axis.
    groups, info = tcn.train_students('C4 MP F D8r', x, feats, n, **kw)
    with mesh_lib.use(mesh_lib.make_mesh(data=2, students=2)):
      mesh_groups, mesh_info = tcn.train_students('C4 MP F D8r', x, feats, n,
                                                  **kw)
    out[f'students{n}'] = _max_diff([g.variables for g in groups],
                                    [g.variables for g in mesh_groups])
    out[f'students{n}_val'] = float(np.max(np.abs(
        np.array(info['val_mse']) - np.array(mesh_info['val_mse']))))
  # A streamed stage (chunks of batches fed to the mesh) vs one device.
  stream = ip.Stream(ip.ArraySource(x))
  one_groups, _ = tcn.train_students('C4 MP F D8r', stream, feats, 3, **kw)
  with mesh_lib.use(mesh_lib.make_mesh(data=2, students=2)):
    mesh_groups, _ = tcn.train_students('C4 MP F D8r', stream, feats, 3, **kw)
  out['stream_students3'] = _max_diff([g.variables for g in one_groups],
                                      [g.variables for g in mesh_groups])
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(out, f)


@pytest.mark.slow
@needs_fmnist
def test_mesh_equals_one_device_on_four_devices(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-c', 'import sys; sys.path[:0] = ["tests", "."]; '
       f'import test_mesh; test_mesh._worker({str(tmp_path)!r})'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
      env=forced_devices_env(4))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'results.json') as f:
    out = json.load(f)
  assert out['devices'] == 4 and out['teacher_batch_devices'] == 4
  # Data-parallel: each step's gradient is summed over 4 devices in another
  # order than on one, so equal to float32 rounding, not bitwise.
  assert out['teacher'] < 1e-5 and out['teacher_loss'] < 1e-5, out
  assert out['features'] < 1e-5, out
  # The head stage and evaluation: forward passes data-parallel equal one
  # device to float32 rounding (1e-5); the head, trained data-parallel, to
  # 1e-5; the test accuracies exactly.
  assert out['student_outputs'] < 1e-5 and out['head'] < 1e-5, out
  assert out['head_views'] < 1e-5, out
  assert all(a == b for a, b in out['head_acc']), out
  assert out['teacher_acc'][0] == out['teacher_acc'][1], out
  for n in ('3',):
    assert out[f'students{n}'] < 1e-6 and out[f'students{n}_val'] < 1e-6, out
  assert out['stream_students3'] < 1e-6, out


def test_mesh_shape_from_devices():
  assert mesh_lib.shape(-1, 1, 4) == (4, 1)
  assert mesh_lib.shape(2, -1, 4) == (2, 2)
  assert mesh_lib.shape(1, 4, 4) == (1, 4)
  for data, students in ((3, -1), (2, 1), (-1, 3)):
    with pytest.raises(TCNError, match='config.mesh'):
      mesh_lib.shape(data, students, 4)
  mesh = mesh_lib.make_mesh()   # This process: one device.
  assert (mesh.shape['data'], mesh.shape['students']) == (1, 1)
  assert mesh_lib.active() is None
  with mesh_lib.use(mesh):
    assert mesh_lib.active() is None   # One device: the plain programs.


@pytest.mark.parametrize('overrides,field', [
    ({'mesh__data': 0}, 'mesh.data'),
    ({'mesh__students': 'two'}, 'mesh.students'),
    ({'mesh__data': -1, 'mesh__students': -1}, 'mesh.data'),
])
def test_bad_mesh_fields_name_the_field(overrides, field):
  with pytest.raises(TCNError, match=f'config.{field}') as e:
    config_lib.resolve(tiny_config(**overrides))
  assert '\n' not in str(e.value)


def test_batch_size_must_split_over_the_data_axis():
  config = config_lib.resolve(tiny_config(teacher__batch_size=30))
  mesh = mesh_lib.make_mesh(devices=[jax.devices()[0]] * 4)
  with pytest.raises(TCNError, match=r'config.teacher.batch_size=30'):
    mesh_lib.check_batch_sizes(config, mesh)
