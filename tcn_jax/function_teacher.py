"""Any teacher from Python: a model no architecture string describes.

The TCN needs three things from a teacher: its dense feature (the students'
targets), its output layer (the TCN head starts as it), and, to check them,
its output. `FunctionTeacher` holds these as functions of the model's own
variables, so a Flax module (`teacher_from_flax`), a Keras model on the JAX
backend (`teacher_from_keras`) or any JAX function can be distilled through
the functional API:

  teacher, t_vars = tcn.teacher_from_flax(module, variables, 'feature',
                                          x_example=x[:8])
  feats = tcn.teacher_features(teacher, t_vars, x)
  groups, _ = tcn.train_students(spec, x, feats, num_students=4, epochs=10)
  net = tcn.TCN(groups, teacher.num_classes, head_dropout=0.0,
                head_variables=tcn.teacher_head(t_vars))

`t_vars` is {'model': the model's own variables, 'params': {'head': {'out':
{'kernel', 'bias'}}}}, the layout `teacher_head` reads for every teacher.
The TCN head is ReLU -> Dense: the feature must be the output layer's
input after a ReLU (non-negative), which the constructors check.
"""
import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tcn_jax.errors import TCNError


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionTeacher:
  """A teacher as functions of its variables, usable where the API takes a
  `models.Teacher` to read features (`teacher_features`).

  Attributes:
    apply_fn: (model_variables, x) -> the model's output (logits or
      probabilities), inference mode.
    feature_fn: (model_variables, x) -> (batch, D) dense feature, the input
      of the output layer.
    num_classes: the output layer's width.
  """
  apply_fn: Callable[[Any, Any], Any]
  feature_fn: Callable[[Any, Any], Any]
  num_classes: int

  def apply(self, variables, x, train: bool = False, method=None):
    """`models.Teacher.apply`'s calling convention: the model's output, or
    with method=self.features (or 'features') the feature."""
    del train   # A given teacher is frozen: always inference mode.
    if method is not None and method not in ('features', self.features):
      raise TCNError(f'FunctionTeacher.apply: unknown method {method!r}')
    fn = self.apply_fn if method is None else self.feature_fn
    return fn(variables['model'], x)

  def features(self, variables, x):
    """(batch, D) features of `x`."""
    return self.feature_fn(variables['model'], x)


def function_teacher(apply_fn, feature_fn, model_variables, kernel, bias, *,
                     x_example, what: str = 'function_teacher'):
  """A teacher from JAX functions and its output layer's weights.

  Args:
    apply_fn: (model_variables, x) -> the model's output (logits, or
      probabilities after a softmax), inference mode.
    feature_fn: (model_variables, x) -> the feature the output layer reads,
      (batch, D) or (batch, ...) (flattened).
    model_variables: the model's variables (any pytree).
    kernel: the output layer's (D, num_classes) weights.
    bias: its (num_classes,) bias.
    x_example: a few inputs (N, ...): the output is checked to equal
      ReLU(feature) @ kernel + bias (or its softmax) on them.
    what: how errors name the caller.

  Returns:
    (teacher, variables): a `FunctionTeacher` and its variables
    {'model': model_variables, 'params': {'head': {'out': {'kernel',
    'bias'}}}} for `teacher_features`, `teacher_head` and `TCN`.

  Raises:
    TCNError when the shapes do not fit or the output is not the output
    layer applied to the feature.
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  bias = jnp.asarray(bias, jnp.float32)
  if kernel.ndim != 2 or bias.shape != kernel.shape[1:]:
    raise TCNError(f'{what}: the output layer needs a (D, classes) kernel and '
                   f'a (classes,) bias, got {kernel.shape} and {bias.shape}')

  def flat_features(v, x):
    f = feature_fn(v, x)
    return f.reshape(f.shape[0], -1)

  teacher = FunctionTeacher(apply_fn, flat_features, int(kernel.shape[1]))
  variables = {'model': model_variables,
               'params': {'head': {'out': {'kernel': kernel, 'bias': bias}}}}
  x = np.asarray(x_example)
  feats = np.asarray(jax.jit(teacher.features)(variables, x))
  if feats.shape[1] != kernel.shape[0]:
    raise TCNError(f'{what}: the feature has {feats.shape[1]} values per '
                   f'example, the output layer reads {kernel.shape[0]}')
  out = np.asarray(jax.jit(teacher.apply)(variables, x), np.float32)
  logits = np.maximum(feats, 0) @ np.asarray(kernel) + np.asarray(bias)
  scale = max(1.0, float(np.abs(out).max()))
  if out.shape != logits.shape or not any(
      float(np.abs(out - y).max()) <= 1e-3 * scale
      for y in (logits, np.asarray(jax.nn.softmax(logits)))):
    raise TCNError(
        f'{what}: the model\'s output is not its output layer applied to '
        'ReLU(feature) on x_example: name the layer whose output the output '
        'layer reads (after its ReLU), and that output layer')
  return teacher, variables


def _lookup(tree, path: str):
  node = tree
  for p in path.split('/'):
    if not isinstance(node, Mapping) or p not in node:
      return None
    node = node[p]
  return node


def teacher_from_flax(module, variables, feature_layer: str, *, x_example,
                      output_layer: str | None = None,
                      apply_kwargs: Mapping[str, Any] | None = None):
  """A Flax linen module as a teacher (any architecture).

  Args:
    module: the `flax.linen.Module`.
    variables: its trained variables ({'params', ...}).
    feature_layer: the feature: a submodule path ('Dense_1', 'backbone/fc')
      whose output is taken (flax `capture_intermediates`), or the name of
      a value the module sows (`self.sow('intermediates', name, x)`; inside
      a submodule: 'sub/name'). It must be the output layer's input.
    x_example: a few inputs (N, ...), used to find and check the layers.
    output_layer: the output Dense's path in variables['params'] (holds
      'kernel' (D, classes) and 'bias'); default: the one Dense whose kernel
      is (D, classes) for this feature and output.
    apply_kwargs: extra keyword arguments of `module.apply` for inference
      (e.g. {'train': False}).

  Returns:
    (teacher, variables) as `function_teacher`.

  Raises:
    TCNError naming `feature_layer` or `output_layer` when they are not
    found or do not reproduce the module's output.
  """
  kwargs = dict(apply_kwargs or {})
  path = tuple(feature_layer.split('/'))
  what = f'teacher_from_flax(feature_layer={feature_layer!r})'

  def capture(mdl, method_name):
    return method_name == '__call__' and tuple(mdl.path) == path

  def feature_fn(v, x):
    _, state = module.apply(v, x, capture_intermediates=capture,
                            mutable=['intermediates'], **kwargs)
    node = _lookup(state.get('intermediates', {}), feature_layer)
    if isinstance(node, Mapping):
      node = node.get('__call__')
    if node is None:
      raise TCNError(f'{what}: no submodule or sown value of that name '
                     '(submodules: a path such as "Dense_1" or "body/fc")')
    return node[0] if isinstance(node, tuple) else node

  apply_fn = lambda v, x: module.apply(v, x, **kwargs)
  x = np.asarray(x_example)
  params = variables.get('params', {})
  if output_layer is None:
    feats = jax.eval_shape(feature_fn, variables, x)
    d = int(np.prod(feats.shape[1:]))
    c = jax.eval_shape(apply_fn, variables, x).shape[-1]
    found = [p for p, leaf in _dense_layers(params)
             if leaf['kernel'].shape == (d, c)]
    if len(found) != 1:
      raise TCNError(f'{what}: {len(found)} Dense layers have a ({d}, {c}) '
                     'kernel; name the output layer with output_layer=')
    output_layer = found[0]
  out = _lookup(params, output_layer)
  if not isinstance(out, Mapping) or 'kernel' not in out or 'bias' not in out:
    raise TCNError(f'teacher_from_flax: output_layer {output_layer!r} is no '
                   "layer with 'kernel' and 'bias' in variables['params']")
  return function_teacher(apply_fn, feature_fn, variables, out['kernel'],
                          out['bias'], x_example=x, what=what)


def _dense_layers(tree, prefix=''):
  """(path, dict) of every sub-dict holding a 2-D 'kernel' and a 'bias'."""
  if not isinstance(tree, Mapping):
    return
  k = tree.get('kernel')
  if k is not None and getattr(k, 'ndim', 0) == 2 and 'bias' in tree:
    yield prefix, tree
  for name, sub in tree.items():
    yield from _dense_layers(sub, f'{prefix}/{name}' if prefix else name)


def teacher_from_keras(model, *, x_example, feature_layer: str | None = None):
  """A Keras 3 model (any architecture) as a teacher, run through JAX.

  Args:
    model: a built `keras.Model` (Sequential or functional) whose last layer
      is its output Dense (softmax or linear); Keras on the JAX backend
      (KERAS_BACKEND=jax before importing keras).
    x_example: a few inputs (N, ...), used to check the layers.
    feature_layer: the name of the layer whose output is the feature
      (default: the output layer's input).

  Returns:
    (teacher, variables) as `function_teacher`; the model's variables are
    {variable path: array}.

  Raises:
    TCNError when Keras is not on the JAX backend, the last layer is not a
    Dense, or the layers do not reproduce the model's output.
  """
  from tcn_jax import keras_convert  # pylint: disable=g-import-not-at-top
  keras = keras_convert.import_keras()
  if keras.backend.backend() != 'jax':
    raise TCNError('teacher_from_keras needs Keras on the JAX backend '
                   f'(set KERAS_BACKEND=jax before importing keras), not '
                   f'{keras.backend.backend()!r}; or save the model and use '
                   'teacher_variables_from_keras / teacher.init_from')
  out_layer = model.layers[-1]
  if type(out_layer).__name__ != 'Dense':
    raise TCNError(f'teacher_from_keras: the last layer {out_layer.name!r} '
                   f'is a {type(out_layer).__name__}, not the output Dense')
  try:
    feature = (model.get_layer(feature_layer).output if feature_layer
               else out_layer.input)
  except ValueError as e:
    raise TCNError(f'teacher_from_keras: feature_layer: {e}') from None
  inputs = model.inputs   # Called on one tensor, not a list of one.
  feature_model = keras.Model(inputs[0] if len(inputs) == 1 else inputs,
                              feature)
  model_variables = {v.path: jnp.asarray(v.value) for v in model.variables}

  def call(m):
    def fn(v, x):
      out, _ = m.stateless_call([v[w.path] for w in m.trainable_variables],
                                [v[w.path] for w in m.non_trainable_variables],
                                x, training=False)
      return out
    return fn

  return function_teacher(
      call(model), call(feature_model), model_variables,
      out_layer.kernel.numpy(), out_layer.bias.numpy() if out_layer.use_bias
      else np.zeros(out_layer.units, np.float32), x_example=x_example,
      what=f'teacher_from_keras(feature_layer={feature_layer!r})')
