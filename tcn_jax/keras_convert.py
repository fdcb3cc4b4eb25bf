"""Keras models as teachers: their weights mapped onto an architecture string.

A Keras model file (`.keras`, or a whole-model `.h5` as the authors' notebooks
save their teachers) or a live `keras.Model` becomes the Flax variables of a
`models.Teacher`: the Keras layers with weights (Conv1D/2D, Dense,
BatchNormalization, Embedding), in order, are matched to the teacher's layers
(its body, then its head's output Dense) by position and shape. Keras' own
residual blocks (layers named `<block>_<i>_conv` / `_bn`, as in
`keras.applications`) are taken in block order (main path, then the
shortcut), so `keras.applications.ResNet50` maps onto a body built with
`BB...k` blocks. A weights-only file (`.weights.h5`, or the `.h5` that
`ResNet50(weights='imagenet')` downloads) is read into
`keras.applications.ResNet50(weights=None)`.

Layouts agree without transposition: Keras is channels-last like Flax (NHWC,
so Flatten orders features alike), conv kernels are (kh, kw, in, out), dense
kernels (in, out). After the mapping, the Keras model and the teacher run on
the same example input; outputs that differ (an activation, padding or
pooling the weights cannot show) are an error.

Keras 3 runs without TensorFlow on the JAX backend: this module sets
KERAS_BACKEND=jax unless it is already set.
"""
import os
import re
import warnings

import jax
import numpy as np

from tcn_jax import models
from tcn_jax.errors import TCNError

KERAS_SUFFIXES = ('.keras', '.h5')
_BLOCK_LAYER = re.compile(r'^(?P<block>.+)_(?P<i>\d+)_(?P<kind>conv|bn)$')
_KINDS = {'Conv1D': 'conv', 'Conv2D': 'conv', 'Conv3D': 'conv',
          'Dense': 'dense', 'BatchNormalization': 'bn', 'Embedding': 'embed'}


def is_keras_file(path) -> bool:
  """Whether `path` names a Keras model or weights file (by its suffix)."""
  return isinstance(path, str) and path.endswith(KERAS_SUFFIXES)


def is_weights_file(path) -> bool:
  """Whether `path` is a Keras weights-only file (`.weights.h5`, or an `.h5`
  without a model, as `ResNet50(weights='imagenet')` downloads): it holds
  no architecture, so it needs `teacher.body` (mapped onto it)."""
  if not is_keras_file(path) or path.endswith('.keras'):
    return False
  if path.endswith('.weights.h5'):
    return True
  if not os.path.isfile(path) or os.path.getsize(path) == 0:
    return False
  try:
    import h5py  # pylint: disable=g-import-not-at-top
    with h5py.File(path, 'r') as f:
      return 'model_config' not in f.attrs
  except (ImportError, OSError):
    return False


_INPUTS = {}


def file_input_shape(path: str, what: str):
  """The per-example input shape (H, W, C) (None for a free dimension) of
  the whole Keras model in `path`; None for a weights-only or missing
  file. Loaded once per file version."""
  if (not is_keras_file(path) or not os.path.isfile(path)
      or is_weights_file(path)):
    return None
  stamp = (os.path.realpath(path), os.stat(path).st_mtime_ns,
           os.path.getsize(path))
  if stamp not in _INPUTS:
    model = load_keras_model(path, 0, None, what)
    shape = model.inputs[0].shape if model.inputs else None
    _INPUTS[stamp] = None if shape is None else tuple(shape[1:])
  return _INPUTS[stamp]


def import_keras():
  """keras, on the JAX backend unless KERAS_BACKEND says otherwise."""
  os.environ.setdefault('KERAS_BACKEND', 'jax')
  try:
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TCNError(f'Keras teachers need keras and h5py (pip install keras '
                   f'h5py; no TensorFlow with KERAS_BACKEND=jax): {e}') from None
  return keras


def load_keras_model(path: str, num_classes: int, input_shape, what: str):
  """The Keras model in `path`: a whole model, or a weights-only file read
  into keras.applications.ResNet50(weights=None)."""
  keras = import_keras()
  if not os.path.isfile(path):
    raise TCNError(f'{what}: no such file')
  if os.path.getsize(path) == 0:
    raise TCNError(f'{what}: the file is empty (0 bytes), corrupt or not '
                   'fully written; save the model again')
  whole = not path.endswith('.weights.h5')
  if whole and path.endswith('.h5'):
    import h5py  # pylint: disable=g-import-not-at-top
    try:
      with h5py.File(path, 'r') as f:
        whole = 'model_config' in f.attrs
    except OSError as e:
      raise TCNError(f'{what}: not an HDF5 file ({e})') from None
  try:
    if whole:
      return keras.models.load_model(path, compile=False)
    model = keras.applications.ResNet50(
        weights=None, input_shape=tuple(input_shape), classes=num_classes)
    model.load_weights(path)
    return model
  except TCNError:
    raise
  except Exception as e:  # Keras raises many types for foreign files.
    kind = 'model' if whole else 'ResNet-50 weights'
    raise TCNError(f'{what}: cannot be read as a Keras {kind} file: '
                   f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
                   ) from None


def _flat_layers(model):
  for layer in model.layers:
    if getattr(layer, 'layers', None):   # A nested Sequential / Model.
      yield from _flat_layers(layer)
    else:
      yield layer


def _numpy(v):
  return np.asarray(v.numpy() if hasattr(v, 'numpy') else v, np.float32)


def keras_units(model, what: str) -> list[dict]:
  """The Keras layers with weights, in mapping order, as dicts (name, kind,
  arrays, epsilon)."""
  units = []
  for layer in _flat_layers(model):
    if not layer.weights:
      continue
    cls = type(layer).__name__
    kind = _KINDS.get(cls)
    if kind is None:
      raise TCNError(f'{what}: Keras layer {layer.name!r} ({cls}) has weights '
                     'that no layer of an architecture string holds')
    if getattr(layer, 'data_format', 'channels_last') != 'channels_last':
      raise TCNError(f'{what}: Keras layer {layer.name!r} is channels_first; '
                     'tcn_jax is channels_last (NHWC)')
    u = dict(name=layer.name, cls=cls, kind=kind)
    if kind in ('conv', 'dense'):
      if kind == 'conv' and (set(layer.dilation_rate) != {1}
                             or layer.groups != 1):
        raise TCNError(f'{what}: Keras layer {layer.name!r} is a dilated or '
                       'grouped convolution, which tcn_jax does not have')
      kernel = _numpy(layer.kernel)
      u['arrays'] = {'kernel': kernel,
                     'bias': (_numpy(layer.bias) if layer.use_bias else
                              np.zeros(kernel.shape[-1], np.float32))}
    elif kind == 'bn':
      if layer.axis not in (-1, len(layer.input.shape) - 1):
        raise TCNError(f'{what}: Keras layer {layer.name!r} normalises axis '
                       f'{layer.axis}, not the channels (last) axis')
      mean = _numpy(layer.moving_mean)
      u['arrays'] = {
          'scale': _numpy(layer.gamma) if layer.scale else np.ones_like(mean),
          'bias': (_numpy(layer.beta) if layer.center
                   else np.zeros_like(mean)),
          'mean': mean, 'var': _numpy(layer.moving_variance)}
      u['epsilon'] = float(layer.epsilon)
    else:
      u['arrays'] = {'embedding': _numpy(layer.embeddings)}
    units.append(u)
  return _block_order(units)


def _block_order(units):
  """Keras residual blocks (`<block>_<i>_conv|bn`) in the order of ours:
  main path 1, 2, 3, then the shortcut 0; other layers stay in place."""
  def block(u):
    m = _BLOCK_LAYER.match(u['name'])
    return m and m.group('block')

  def order(u):
    m = _BLOCK_LAYER.match(u['name'])
    return (m.group('i') == '0', int(m.group('i')), m.group('kind') == 'bn')

  out, i = [], 0
  while i < len(units):
    j = i + 1
    if block(units[i]):
      while j < len(units) and block(units[j]) == block(units[i]):
        j += 1
      out.extend(sorted(units[i:j], key=order))
    else:
      out.append(units[i])
    i = j
  return out


def teacher_units(teacher: models.Teacher) -> list[dict]:
  """The teacher's layers with weights in mapping order: (path in the
  variables, kind, BatchNorm epsilon, the token they come from)."""
  units, count = [], {}

  def add(prefix, name, kind, token, eps=None):
    units.append(dict(path=(*prefix, name), kind=kind, token=token,
                      epsilon=eps))

  def next_name(cls):
    n = count.get(cls, 0)
    count[cls] = n + 1
    return f'{cls}_{n}'

  tokens = teacher.body.split()
  for token, layer in zip(tokens, models.parse(teacher.body)):
    kind = layer['kind']
    if kind == 'conv':
      add(('trunk',), next_name('Conv'), 'conv', token)
    elif kind == 'dense':
      add(('trunk',), next_name('Dense'), 'dense', token)
    elif kind == 'bn':
      add(('trunk',), next_name('BatchNorm'), 'bn', token, layer['epsilon'])
    elif kind == 'embed':
      add(('trunk',), next_name('Embed'), 'embed', token)
    elif kind in ('basic', 'bottleneck'):
      block = ('trunk', next_name('ResidualBlock'))
      eps = models.KERAS_RESNET_EPSILON if layer['keras'] else 1e-3
      # Main path, then (where the shape changes) the shortcut; which blocks
      # have one is read from the template in `to_variables`.
      for i in range(4 if kind == 'bottleneck' else 3):
        add(block, f'Conv_{i}', 'conv', token)
        add(block, f'BatchNorm_{i}', 'bn', token, eps)
  if teacher.head_bn:
    add(('head',), 'BatchNorm_0', 'bn', 'head BN', 1e-3)
  add(('head',), 'out', 'dense', f'head Dense{teacher.num_classes}')
  return units


def _get(tree, path):
  for p in path:
    if not isinstance(tree, dict) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def to_variables(units, teacher: models.Teacher, x_example, what: str):
  """Maps Keras `units` onto `teacher`'s variables by position and shape."""
  template = jax.eval_shape(lambda: teacher.init(jax.random.key(0),
                                                 x_example))
  ours = [u for u in teacher_units(teacher)
          if _get(template['params'], u['path']) is not None]
  variables = {}
  for k, o in zip(units, ours):
    name = '/'.join(o['path'])
    desc = f'Keras layer {k["name"]!r} ({k["cls"]})'
    if k['kind'] != o['kind']:
      raise TCNError(f'{what}: {desc} meets teacher layer {name} '
                     f'({o["token"]!r}, a {o["kind"]} layer)')
    for field, array in k['arrays'].items():
      col = 'batch_stats' if field in ('mean', 'var') else 'params'
      want = _get(template[col], (*o['path'], field)).shape
      if tuple(array.shape) != tuple(want):
        raise TCNError(f'{what}: {desc} {field} has shape {array.shape}, '
                       f'teacher layer {name} ({o["token"]!r}) needs {want}')
      _set(variables.setdefault(col, {}), (*o['path'], field), array)
    if o['kind'] == 'bn' and not np.isclose(k['epsilon'], o['epsilon'],
                                            rtol=1e-6, atol=0):
      raise TCNError(f'{what}: {desc} has BatchNorm epsilon {k["epsilon"]}, '
                     f'teacher layer {name} ({o["token"]!r}) uses '
                     f'{o["epsilon"]} (write BN{k["epsilon"]} in '
                     'config.teacher.body)')
  if len(units) != len(ours):
    first = (f'Keras layer {units[len(ours)]["name"]!r} has no counterpart'
             if len(units) > len(ours) else
             f'teacher layer {"/".join(ours[len(units)]["path"])} '
             f'({ours[len(units)]["token"]!r}) has no Keras counterpart')
    raise TCNError(f'{what}: the Keras model has {len(units)} layers with '
                   f'weights, the teacher (its body and output layer)'
                   f' {len(ours)}: {first}')
  return jax.tree_util.tree_map(np.asarray, variables)


def keras_input(teacher: models.Teacher, x):
  """The Keras model's input for teacher input `x`: the body's leading
  preprocessing tokens (CAFFE) applied, as keras.applications leave
  `preprocess_input` outside the model."""
  tokens = teacher.body.split()
  k = 0
  while k < len(tokens) and models.parse(tokens[k])[0]['kind'] == 'caffe':
    k += 1
  if not k:
    return np.asarray(x)
  return np.asarray(models.Net(' '.join(tokens[:k])).apply({}, x))


def check_outputs(model, teacher, variables, x_example, what: str):
  """Raises TCNError unless the Keras model's output on `x_example` (after
  the body's preprocessing tokens) is the teacher's logits or their softmax
  (float32 tolerance)."""
  x = np.asarray(x_example)
  with warnings.catch_warnings():   # Keras warns about input names.
    warnings.simplefilter('ignore')
    ref = np.asarray(model(keras_input(teacher, x), training=False),
                     np.float32)
  logits = np.asarray(jax.jit(teacher.apply)(variables, x), np.float32)
  scale = max(1.0, float(np.abs(ref).max()))
  diffs = []
  for ours in (logits, np.asarray(jax.nn.softmax(logits))):
    if ours.shape != ref.shape:
      raise TCNError(f'{what}: the Keras model outputs shape {ref.shape[1:]},'
                     f' the teacher {ours.shape[1:]}')
    diffs.append(float(np.abs(ours - ref).max()))
    if diffs[-1] <= 1e-3 * scale:
      return
  raise TCNError(
      f'{what}: the weights fit config.teacher.body by shape, but the Keras '
      f'model and the teacher give different outputs on the same input (max '
      f'difference {min(diffs):.3g}): an activation, padding, pooling or '
      'input scaling differs')


def teacher_variables_from_keras(model, teacher: models.Teacher, x_example,
                                 *, check: bool = True,
                                 what: str = 'teacher_variables_from_keras'):
  """A Keras model's weights as the Flax variables of `teacher`.

  Args:
    model: a `keras.Model`, or the path of a Keras model file (`.keras`, a
      whole-model `.h5`) or of keras.applications.ResNet50 weights
      (`.weights.h5`, or the `.h5` of `ResNet50(weights='imagenet')`).
    teacher: the `models.Teacher` whose architecture string the Keras model
      follows layer for layer (e.g. 'C32 C64 MP Do.25 F D256r D256r' for
      Conv2D(32), Conv2D(64), MaxPooling2D, Dropout, Flatten, Dense(256),
      Dense(256), then Dense(num_classes) as the head).
    x_example: a few example inputs (N, ...) of the data.
    check: also compare both models' outputs on `x_example`.
    what: how errors name the source (e.g. the config field).

  Returns:
    Flax variables {'params', ['batch_stats']} for `teacher.apply`.

  Raises:
    TCNError naming the Keras layer and the teacher's layer on a mismatch
    (layer count, kind, shape or BatchNorm epsilon), or when the outputs
    differ.
  """
  x_example = np.asarray(x_example)
  if isinstance(model, str):
    what = f'{what} {model!r}'
    model = load_keras_model(model, teacher.num_classes, x_example.shape[1:],
                             what)
  variables = to_variables(keras_units(model, what), teacher,
                           x_example[:1], what)
  if check:
    check_outputs(model, teacher, variables, x_example, what)
  return variables
