"""Export: the TCN and each student as StableHLO (jax.export) and ONNX files
that reproduce make_predict / the student's forward without the model code."""
import os

import jax
import numpy as np
import pytest

import tcn_jax as tcn
from helpers import needs_fmnist
from helpers import tiny_config
from tcn_jax import engine
from tcn_jax.export import load
from tcn_jax.export_cli import main as export_main
from tcn_jax.errors import TCNError


@pytest.fixture(scope='module')
def exported_run(tmp_path_factory):
  """A tiny trained TCN (PCA chunks, BatchNorm students) whose run wrote
  every format into workdir/export/."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config(export__formats='stablehlo,onnx', chunking='pca',
                       teacher__epochs=1, students__epochs=1, head__epochs=1,
                       students__arch='C4 BN R MP F D8r')
  results = tcn.run(config, workdir)
  predict, net = tcn.load_tcn(os.path.join(workdir, 'tcn'))
  ds = tcn.load_dataset('fashion_mnist', train_size=100, test_size=40)
  return workdir, results, predict, net, ds.test.x[:13]


def _student_forward(net, i, x):
  """Student i's output through its own Flax module (no export code)."""
  for g in net.groups:
    if i in g.member_ids:
      m = g.member_ids.index(i)
      variables = engine.unstack(g.variables, len(g.member_ids))[m]
      return np.asarray(g.model(net.impl).apply(variables, x))
  raise AssertionError(i)


@needs_fmnist
def test_run_exports_tcn_and_students(exported_run):
  workdir, results, predict, net, x = exported_run
  assert results['export'] == [
      f'export/{stem}.{fmt}' for fmt in ('stablehlo', 'onnx')
      for stem in ('tcn', 'student0', 'student1')]
  logits = np.asarray(predict(x))
  for fmt in ('stablehlo', 'onnx'):
    run = load(os.path.join(workdir, 'export', f'tcn.{fmt}'))
    np.testing.assert_allclose(run(x), logits, atol=1e-5, rtol=0)
    # Any batch size: the batch axis is polymorphic.
    np.testing.assert_allclose(run(x[:1]), logits[:1], atol=1e-5, rtol=0)
    outs = []
    for i in range(net.num_students):
      path = os.path.join(workdir, 'export', f'student{i}.{fmt}')
      outs.append(load(path)(x))
      np.testing.assert_allclose(outs[-1], _student_forward(net, i, x),
                                 atol=1e-5, rtol=0)
    # The students served apart, joined: the TCN's logits.
    features = net.chunker.decode(np.concatenate(outs, -1))
    np.testing.assert_allclose(
        tcn.Head(10, net.head_dropout).apply(net.head_variables, features),
        logits, atol=1e-5, rtol=0)


@needs_fmnist
def test_stablehlo_runs_with_jax_alone(exported_run):
  """The artifact holds the program: jax.export.deserialize runs it."""
  workdir, _, predict, _, x = exported_run
  with open(os.path.join(workdir, 'export', 'tcn.stablehlo'), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  np.testing.assert_allclose(exported.call(x), predict(x), atol=1e-5, rtol=0)


@needs_fmnist
def test_api_fixed_batch_and_command_line(exported_run, tmp_path, capsys):
  workdir, _, predict, net, x = exported_run
  path = tcn.export(net, str(tmp_path / 's1.stablehlo'), 'stablehlo',
                    input_shape=x.shape[1:], batch_size=4, student=1)
  out = load(path)(x[:4])
  np.testing.assert_allclose(out, _student_forward(net, 1, x[:4]), atol=1e-5,
                             rtol=0)
  with pytest.raises(Exception):   # Fixed batch: 4 only.
    load(path)(x[:5])
  export_main(['--workdir', workdir, '--formats', 'stablehlo',
                   '--input_shape', '28,28,1'])
  assert len(capsys.readouterr().out.split()) == 3


@needs_fmnist
@pytest.mark.parametrize('kwargs, message', [
    (dict(format='tflite'), "unknown export format 'tflite'"),
    (dict(path='missing/dir/tcn.onnx'), 'does not exist'),
    (dict(path='.'), 'is a directory'),
    (dict(student=2), 'no student 2'),
    (dict(batch_size=0), 'batch_size must be'),
    (dict(impl='fast'), 'impl must be one of'),
    (dict(input_shape=(5, 5, 1)), 'this network takes'),
])
def test_bad_export_arguments(exported_run, tmp_path, kwargs, message):
  _, _, _, net, x = exported_run
  kwargs = {'path': 'tcn.stablehlo', 'input_shape': x.shape[1:], **kwargs}
  kwargs['path'] = str(tmp_path / kwargs['path'])
  with pytest.raises(TCNError, match=message):
    tcn.export(net, **kwargs)
  assert os.listdir(tmp_path) == []


def test_bad_export_config_and_command_line(tmp_path, capsys):
  with pytest.raises(TCNError,
                     match=r"format 'pdf' \(config\.export\.formats\)"):
    tcn.resolve_config(tiny_config(export__formats='onnx,pdf'))
  with pytest.raises(TCNError, match='config.export.batch_size'):
    tcn.resolve_config(tiny_config(export__batch_size=-1))
  with pytest.raises(SystemExit) as e:
    export_main(['--workdir', str(tmp_path), '--formats', 'onnx'])
  assert e.value.code == 2
  assert 'holds no trained TCN' in capsys.readouterr().err
