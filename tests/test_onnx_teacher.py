"""ONNX teachers (init_from=*.onnx, teacher_from_onnx) and precomputed
features (features_from, precomputed_teacher).

The fixtures under tests/fixtures/onnx/ were exported from real PyTorch
models by experiments/make_onnx_fixtures.py; these tests need no torch.
"""
import json
import os

import numpy as np
import onnx
from onnx import helper
from onnx import TensorProto
import onnxruntime as ort
import pytest

from helpers import forced_devices_env, needs_fmnist, tiny_config
import tcn_jax as tcn
from tcn_jax import config as config_lib
from tcn_jax import data as data_lib
from tcn_jax import input_pipeline
from tcn_jax import metrics
from tcn_jax import onnx_teacher
from tcn_jax import pipeline
from tcn_jax.errors import TCNError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'fixtures', 'onnx')
CNN = os.path.join(FIXTURES, 'fmnist_cnn.onnx')
RESNET = os.path.join(FIXTURES, 'resnet18_w8.onnx')


def _record():
  with open(os.path.join(FIXTURES, 'fixtures.json')) as f:
    return json.load(f)


def _whole_graph(path, x_nchw):
  """onnxruntime's own output of the unmodified graph."""
  s = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  return s.run(None, {s.get_inputs()[0].name: x_nchw})[0]


def _one_line(e):
  assert '\n' not in str(e.value), str(e.value)


def test_resnet_features_and_head_equal_whole_graph_and_pytorch():
  torch_out = np.load(os.path.join(FIXTURES, 'torch_outputs.npz'))
  x_nchw = torch_out['resnet_x']
  x = x_nchw.transpose(0, 2, 3, 1)   # The library's NHWC.
  teacher, t_vars = tcn.teacher_from_onnx(RESNET, x_example=x[:4])
  assert teacher.info['layout'] == 'NCHW'
  logits, feats = teacher.run_host(x)
  np.testing.assert_array_equal(logits, _whole_graph(RESNET, x_nchw))
  np.testing.assert_allclose(logits, torch_out['resnet_logits'], atol=1e-5)
  np.testing.assert_allclose(feats, torch_out['resnet_features'], atol=1e-5)
  head = tcn.teacher_head(t_vars)['params']['out']
  np.testing.assert_allclose(
      np.maximum(feats, 0) @ np.asarray(head['kernel']) + head['bias'],
      logits, atol=1e-5)
  # Through JAX (pure_callback under jit), as the pipeline calls it.
  np.testing.assert_array_equal(tcn.teacher_features(teacher, t_vars, x, 8),
                                feats)


@needs_fmnist
def test_fmnist_teacher_accuracy_equals_pytorch():
  rec = _record()
  ds = tcn.load_dataset('fashion_mnist')
  n = rec['test_subset']
  x, y = ds.test.x[:n], ds.test.y[:n]
  teacher, t_vars = tcn.teacher_from_onnx(CNN, x_example=x[:8])
  logits, feats = teacher.run_host(x)
  np.testing.assert_array_equal(
      logits, _whole_graph(CNN, np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
  torch_out = np.load(os.path.join(FIXTURES, 'torch_outputs.npz'))
  m = len(torch_out['fmnist_logits'])
  np.testing.assert_allclose(logits[:m], torch_out['fmnist_logits'],
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(feats[:m], torch_out['fmnist_features'],
                             atol=1e-5, rtol=1e-5)
  import jax  # pylint: disable=g-import-not-at-top
  acc = metrics.evaluate(jax.jit(lambda b: teacher.apply(t_vars, b)), x, y,
                         500)
  assert acc == rec['torch_test_acc_subset']


def _no_head_model(path):
  """Conv -> GlobalAveragePool -> Flatten: no Gemm/MatMul output layer."""
  w = helper.make_tensor('w', TensorProto.FLOAT, [4, 1, 3, 3],
                         np.ones(36, np.float32).tolist())
  graph = helper.make_graph(
      [helper.make_node('Conv', ['x', 'w'], ['c']),
       helper.make_node('GlobalAveragePool', ['c'], ['p']),
       helper.make_node('Flatten', ['p'], ['y'])], 'nohead',
      [helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                     ['N', 1, 28, 28])],
      [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['N', 4])],
      [w])
  onnx.save(helper.make_model(graph), path)
  return path


def test_bad_onnx_teachers_one_line(tmp_path):
  x = np.zeros((2, 28, 28, 1), np.float32)
  with pytest.raises(TCNError, match='no Gemm or MatMul') as e:
    tcn.teacher_from_onnx(_no_head_model(str(tmp_path / 'nohead.onnx')),
                          x_example=x)
  _one_line(e)
  with pytest.raises(TCNError, match="'nope'.*candidates") as e:
    tcn.teacher_from_onnx(CNN, x_example=x, feature_tensor='nope')
  _one_line(e)
  with pytest.raises(TCNError, match=r'\(N, 1, 28, 28\).*NHWC') as e:
    tcn.teacher_from_onnx(CNN, x_example=np.zeros((2, 32, 32, 3), np.float32))
  _one_line(e)
  with pytest.raises(TCNError, match='no such ONNX file'):
    tcn.teacher_from_onnx(str(tmp_path / 'missing.onnx'), x_example=x)


def _keras_like_model(path, rng):
  """A tf2onnx-like graph: NHWC input, Reshape, MatMul + Add, Relu,
  a transposed constant weight, Softmax output."""
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  w1 = rng.normal(0, 0.05, (784, 32)).astype(np.float32)
  w2t = rng.normal(0, 0.5, (10, 32)).astype(np.float32)
  inits = [numpy_helper.from_array(a, n) for a, n in (
      (np.array([-1, 784], np.int64), 'shape'), (w1, 'w1'),
      (np.full(32, 0.1, np.float32), 'b1'), (w2t, 'w2t'),
      (np.arange(10, dtype=np.float32) / 10, 'b2'))]
  nodes = [helper.make_node('Reshape', ['x', 'shape'], ['flat']),
           helper.make_node('MatMul', ['flat', 'w1'], ['h']),
           helper.make_node('Add', ['h', 'b1'], ['hb']),
           helper.make_node('Relu', ['hb'], ['feature']),
           helper.make_node('Transpose', ['w2t'], ['w2'], perm=[1, 0]),
           helper.make_node('MatMul', ['feature', 'w2'], ['z']),
           helper.make_node('Add', ['z', 'b2'], ['logits']),
           helper.make_node('Softmax', ['logits'], ['probs'], axis=1)]
  graph = helper.make_graph(
      nodes, 'keraslike',
      [helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                     ['N', 28, 28, 1])],
      [helper.make_tensor_value_info('probs', TensorProto.FLOAT, ['N', 10])],
      inits)
  onnx.save(helper.make_model(graph, opset_imports=[
      helper.make_opsetid('', 13)]), path)
  return w2t.T, np.arange(10, dtype=np.float32) / 10


def test_keras_like_graph_nhwc_matmul_add_softmax(tmp_path):
  rng = np.random.default_rng(0)
  path = str(tmp_path / 'keraslike.onnx')
  kernel, bias = _keras_like_model(path, rng)
  x = rng.uniform(0, 1, (6, 28, 28, 1)).astype(np.float32)
  teacher, t_vars = tcn.teacher_from_onnx(path, x_example=x)
  assert teacher.info['layout'] == 'NHWC'
  assert teacher.info['feature_tensor'] == 'feature'
  head = tcn.teacher_head(t_vars)['params']['out']
  np.testing.assert_array_equal(head['kernel'], kernel)
  np.testing.assert_array_equal(head['bias'], bias)
  probs, feats = teacher.run_host(x)
  np.testing.assert_array_equal(probs, _whole_graph(path, x))
  z = feats @ kernel + bias
  np.testing.assert_allclose(
      probs, np.exp(z) / np.exp(z).sum(1, keepdims=True), atol=1e-6)


def test_named_feature_tensor_and_fc1_refused():
  model = onnx.load(CNN)
  heads = onnx_teacher.head_candidates(model)
  assert len(heads) == 2   # fc1 (the Flatten's output) and fc (the head).
  final = onnx_teacher.find_head(model)
  assert final.kernel.shape == (64, 10)
  x = np.random.default_rng(0).uniform(0, 1, (4, 28, 28, 1)).astype(
      np.float32)
  teacher, _ = tcn.teacher_from_onnx(CNN, x_example=x,
                                     feature_tensor=final.feature)
  assert teacher.info['feature_tensor'] == final.feature
  fc1 = [h for h in heads if h is not final and h.feature != final.feature]
  with pytest.raises(TCNError, match='does not make the graph') as e:
    tcn.teacher_from_onnx(CNN, x_example=x, feature_tensor=fc1[0].feature)
  _one_line(e)


def test_scale_warning():
  x = np.full((2, 28, 28, 1), 0.5, np.float32)
  assert onnx_teacher.check_scale(x, x, None, None) == ''
  assert '0..255' in onnx_teacher.check_scale(
      x, x, np.array([123.7]), np.array([58.4]))
  assert 'reach' in onnx_teacher.check_scale(x * 255, x * 255, None, None)


def test_input_scaling_applied_and_warned(caplog):
  x = np.random.default_rng(0).uniform(0, 1, (4, 28, 28, 1)).astype(
      np.float32)
  teacher, _ = tcn.teacher_from_onnx(CNN, x_example=x, input_mean='0.5',
                                     input_std='0.25')
  want = _whole_graph(CNN, ((x - 0.5) / 0.25).transpose(0, 3, 1, 2))
  np.testing.assert_array_equal(teacher.run_host(x)[0], want)
  assert teacher.info['input_std'] == [0.25]
  with caplog.at_level('WARNING'):
    tcn.teacher_from_onnx(CNN, x_example=x, input_mean='33.3',
                          input_std='76.7')
  assert '0..255 units' in caplog.text
  with pytest.raises(TCNError, match='3 values, the data 1 channels'):
    tcn.teacher_from_onnx(CNN, x_example=x, input_mean='0.4,0.4,0.4')


def _splits(config):
  return input_pipeline.load(config_lib.resolve(config).data)


@needs_fmnist
def test_pipeline_with_onnx_teacher_end_to_end(tmp_path):
  config = tiny_config(teacher__init_from=CNN)
  config.export.formats = 'onnx'
  results = pipeline.run(config, str(tmp_path / 'run'))
  ds = _splits(config)
  teacher, _ = tcn.teacher_from_onnx(CNN, x_example=ds.train.x[:2])
  whole = _whole_graph(CNN, np.ascontiguousarray(
      ds.test.x.transpose(0, 3, 1, 2)))
  assert results['teacher_test_acc'] == metrics.accuracy(whole, ds.test.y)
  src = results['teacher_source']
  assert src['source'] == 'onnx' and src['layout'] == 'NCHW'
  assert src['digest'] == onnx_teacher.file_digest(CNN)
  assert results['params']['teacher'] == 1568 * 64 + 64 + 64 * 10 + 10 + (
      16 * 9 + 16 + 32 * 16 * 9 + 32)   # The ONNX graph's weights.
  assert results['teacher_test_acc'] > 0.6
  assert os.path.exists(tmp_path / 'run' / 'export' / 'tcn.onnx')
  # Class names travel with the run.
  assert results['classes'] == data_lib.CLASS_NAMES['fashion_mnist']
  with open(tmp_path / 'run' / 'config.json') as f:
    assert json.load(f)['classes'][9] == 'Ankle boot'
  # Resume: every stage reused, the same TCN.
  again = pipeline.run(config, str(tmp_path / 'run'))
  assert again['digests'] == results['digests']
  assert again['stage_keys'] == results['stage_keys']
  predict, net, names = tcn.load_tcn(str(tmp_path / 'run' / 'tcn'),
                                     with_classes=True)
  assert names == results['classes']
  assert net.num_classes == 10   # The TCN runs without the teacher:
  acc = metrics.evaluate(predict, ds.test.x, ds.test.y)
  assert acc == results['tcn_test_acc_after_finetune']

  # The same teacher as precomputed features: the same teacher accuracy.
  feats = tmp_path / 'feats'
  feats.mkdir()
  for s in ('train', 'val', 'test'):
    np.save(feats / f'features.{s}.npy',
            teacher.run_host(getattr(ds, s).x)[1])
  head = onnx_teacher.find_head(onnx.load(CNN))
  np.savez(feats / 'head.npz', kernel=head.kernel, bias=head.bias)
  results = pipeline.run(tiny_config(teacher__features_from=str(feats)),
                         str(tmp_path / 'run_features'))
  assert abs(results['teacher_test_acc'] - again['teacher_test_acc']) < 0.011
  assert results['teacher_source']['source'] == 'features'

  # Its head's classes in another order: near chance, stopped.
  np.savez(feats / 'head.npz', kernel=np.roll(head.kernel, 3, 1),
           bias=np.roll(head.bias, 3))
  with pytest.raises(TCNError, match='class order') as e:
    pipeline.run(tiny_config(teacher__features_from=str(feats)),
                 str(tmp_path / 'run_shuffled'))
  _one_line(e)


@needs_fmnist
@pytest.mark.parametrize('problem,match', [
    ('missing', 'features.val.npy: missing'),
    ('rows', r'features.train.npy: \d+ rows, the data'),
    ('nan', 'features.test.npy: holds NaN'),
    ('head', 'head.npz: kernel of shape'),
    ('classes', 'has 5 classes, the data'),
])
def test_bad_features_dir_one_line_before_any_work(tmp_path, problem, match):
  config = tiny_config()
  ds = _splits(config)
  rng = np.random.default_rng(0)
  d = tmp_path / 'feats'
  d.mkdir()
  for s in ('train', 'val', 'test'):
    f = rng.uniform(0, 1, (len(getattr(ds, s)), 16)).astype(np.float32)
    if problem == 'rows' and s == 'train':
      f = f[1:]
    if problem == 'nan' and s == 'test':
      f[3, 2] = np.nan
    if not (problem == 'missing' and s == 'val'):
      np.save(d / f'features.{s}.npy', f)
  classes = 5 if problem == 'classes' else 10
  kernel = rng.normal(size=(15 if problem == 'head' else 16, classes))
  np.savez(d / 'head.npz', kernel=kernel, bias=np.zeros(classes))
  with pytest.raises(TCNError, match=match) as e:
    pipeline.run(tiny_config(teacher__features_from=str(d)),
                 str(tmp_path / 'run'))
  _one_line(e)
  assert not os.path.exists(tmp_path / 'run')


def test_precomputed_teacher_api_lists_every_problem():
  f = np.ones((5, 4), np.float32)
  feats, t_vars = tcn.precomputed_teacher(
      {'train': f, 'val': f, 'test': f}, np.ones((4, 3)), np.zeros(3))
  assert tcn.teacher_head(t_vars)['params']['out']['kernel'].shape == (4, 3)
  bad = f.copy()
  bad[0, 0] = np.inf
  with pytest.raises(TCNError) as e:
    tcn.precomputed_teacher({'train': f, 'test': bad}, np.ones((4, 3)),
                            np.zeros(2), rows={'train': 6, 'val': 5,
                                               'test': 5})
  lines = str(e.value).splitlines()
  assert len(lines) == 5, lines   # Summary + one line per problem.


@needs_fmnist
def test_onnx_teacher_refusals_one_line(tmp_path):
  with pytest.raises(TCNError, match='online') as e:
    pipeline.run(tiny_config(teacher__init_from=CNN,
                             students__features='online'),
                 str(tmp_path / 'run'))
  _one_line(e)
  with pytest.raises(TCNError, match='no Gemm or MatMul') as e:
    pipeline.run(tiny_config(teacher__init_from=_no_head_model(
        str(tmp_path / 'nohead.onnx'))), str(tmp_path / 'run'))
  _one_line(e)
  assert not os.path.exists(tmp_path / 'run')


def _image_folder(root, classes=10, per_class=5, size=64, seed=0):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for c in range(classes):
    os.makedirs(os.path.join(root, f'class{c}'), exist_ok=True)
    for i in range(per_class):
      a = (rng.random((size, size, 3)) * 255).astype(np.uint8)
      Image.fromarray(a).save(os.path.join(root, f'class{c}', f'{i}.png'))


def test_resnet_onnx_teacher_over_a_streamed_folder(tmp_path):
  """Features of a streamed split go batch by batch into the memory-mapped
  cache; a random-weights teacher (near chance) runs with allow_chance."""
  import image_folder  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / 'images')
  _image_folder(os.path.join(root, 'train'))
  _image_folder(os.path.join(root, 'val'), per_class=2, seed=1)
  c = image_folder.get_config('smoke')
  c.data.update(dir=root, image_size=64, streaming='always')
  c.teacher.init_from = RESNET
  c.teacher.epochs = c.students.epochs = c.head.epochs = 1
  with pytest.raises(TCNError, match='near chance'):
    pipeline.run(c, str(tmp_path / 'refused'))
  c.teacher.allow_chance = True
  work = tmp_path / 'run'
  results = pipeline.run(c, str(work))
  assert 'streamed' in results['data_source']
  ds = input_pipeline.load(config_lib.resolve(c).data)
  cached = np.load(work / 'features.train.npy', mmap_mode='r')
  teacher, _ = tcn.teacher_from_onnx(RESNET, x_example=ds.train.x[:2])
  x = ds.train.x[:]
  np.testing.assert_array_equal(cached, teacher.run_host(x)[1])
  whole = _whole_graph(RESNET, np.ascontiguousarray(
      ds.test.x[:].transpose(0, 3, 1, 2)))
  assert results['teacher_test_acc'] == metrics.accuracy(whole, ds.test.y)


def test_features_on_a_mesh_run_on_the_host():
  """On a mesh of several devices the ONNX session runs on the host, not
  inside the data-parallel program (a host callback there deadlocks)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = f'''
import numpy as np
import tcn_jax as tcn
from tcn_jax import mesh as mesh_lib
x = np.load({os.path.join(FIXTURES, 'torch_outputs.npz')!r})['resnet_x']
x = x.transpose(0, 2, 3, 1)
teacher, v = tcn.teacher_from_onnx({RESNET!r}, x_example=x[:2])
with mesh_lib.use(mesh_lib.make_mesh(2, 1)):
  got = tcn.teacher_features(teacher, v, x, 8)
np.testing.assert_array_equal(got, teacher.run_host(x)[1])
print('OK')
'''
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = forced_devices_env(2)
  out = subprocess.run([sys.executable, '-c', code], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.stdout.strip().endswith('OK'), out.stderr[-2000:]
