"""Teachers from ONNX graphs (PyTorch, TensorFlow, ...), run by onnxruntime.

The TCN needs the teacher's dense feature and its output layer. In an ONNX
graph these are the input of the graph's final Gemm (or MatMul + Add) and
that node's constant weights:

  teacher, t_vars = tcn.teacher_from_onnx('model.onnx', x_example=x[:8])
  feats = tcn.teacher_features(teacher, t_vars, x)
  net = tcn.TCN(groups, teacher.num_classes, head_dropout=0.0,
                head_variables=tcn.teacher_head(t_vars))

The feature tensor is added to the graph's outputs, so one
`onnxruntime.InferenceSession` gives both the feature and the graph's own
output (the teacher's logits, or probabilities after a Softmax).

Inputs: the library's batches are NHWC floats (pixels in [0, 1]). A graph
whose input is (N, C, H, W) for the data's (H, W, C) (PyTorch's layout) gets
them transposed (`input_layout='auto'` detects it from the graph's input
shape; 'NCHW' / 'NHWC' force it). `input_mean` / `input_std` (per channel)
are applied first: x -> (x - mean) / std (default: none).

On the host: `teacher_features`, the features stage, the teacher's
accuracy and the KD baseline's logits call the session on numpy batches
(`host_features`, `host_logits`), outside XLA, so a mesh of several devices
changes nothing. `teacher.apply` wraps it in `jax.pure_callback` for jitted
API code on one device; it is not part of the students' compiled step
(`students.features=online` is refused).
"""
import dataclasses
import hashlib
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from tcn_jax.errors import TCNError
from tcn_jax.function_teacher import FunctionTeacher

LAYOUTS = ('auto', 'NCHW', 'NHWC')   # '' is 'auto'.
# Ops between the head and the graph's output that keep the argmax.
_PASS_OPS = ('Identity', 'Softmax', 'Cast')
# Ops between a named feature and the head's input (same values, flattened).
_FLAT_OPS = ('Flatten', 'Reshape', 'Squeeze', 'Identity')


def is_onnx_file(path: str) -> bool:
  return isinstance(path, str) and path.lower().endswith('.onnx')


def file_digest(path: str) -> str:
  """sha256 of the file's bytes (the teacher's stage key)."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def parse_floats(what: str, value) -> np.ndarray | None:
  """'0.485, 0.456, 0.406' (or a number or a sequence) -> float32 array;
  '' / None -> None."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  try:
    if isinstance(value, str):
      out = [float(v) for v in value.replace(',', ' ').split()]
    else:
      out = np.ravel(np.asarray(value, np.float64)).tolist()
  except (TypeError, ValueError):
    raise TCNError(f'{what} must be numbers (one, or one per channel, e.g. '
                   f"'0.485,0.456,0.406'), got {value!r}") from None
  return np.asarray(out, np.float32)


@dataclasses.dataclass(frozen=True)
class HeadNode:
  """The graph's output layer: feature tensor -> kernel, bias -> out."""
  feature: str       # The head's input tensor (what the session returns).
  kernel: np.ndarray  # (D, classes)
  bias: np.ndarray    # (classes,)
  out: str           # The head's output tensor.
  node: str          # Its node's name or op, for messages.


def _imports():
  try:
    import onnx  # pylint: disable=g-import-not-at-top
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TCNError(f'ONNX teachers need onnx and onnxruntime ({e}): pip '
                   "install 'tcn_jax[onnx]'") from None
  return onnx, onnxruntime


def _load(path: str):
  onnx, _ = _imports()
  try:
    return onnx.load(path)
  except FileNotFoundError:
    raise TCNError(f'{path!r}: no such ONNX file') from None
  except Exception as e:  # pylint: disable=broad-except  (protobuf errors)
    raise TCNError(f'{path!r} is not an ONNX model ({type(e).__name__}: '
                   f'{str(e)[:120]})') from None


def _constants(graph) -> dict[str, np.ndarray]:
  """Constant tensors: initializers, Constant nodes, and what Identity /
  Transpose / Cast of a constant gives."""
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  for node in graph.node:
    if node.op_type == 'Constant':
      for a in node.attribute:
        if a.name == 'value':
          consts[node.output[0]] = numpy_helper.to_array(a.t)
    elif node.input and node.input[0] in consts:
      x = consts[node.input[0]]
      if node.op_type in ('Identity', 'Cast'):
        consts[node.output[0]] = x
      elif node.op_type == 'Transpose':
        perm = [list(a.ints) for a in node.attribute if a.name == 'perm']
        consts[node.output[0]] = np.transpose(x, perm[0] if perm else None)
  return consts


def _attr(node, name, default):
  for a in node.attribute:
    if a.name == name:
      return a.f if a.type == a.FLOAT else a.i
  return default


def head_candidates(model) -> list[HeadNode]:
  """Every Gemm / MatMul(+Add) node with a constant 2-D weight."""
  graph = model.graph
  consts = _constants(graph)
  consumers = {}
  for node in graph.node:
    for i in node.input:
      consumers.setdefault(i, []).append(node)
  found = []
  for node in graph.node:
    if node.op_type not in ('Gemm', 'MatMul') or len(node.input) < 2:
      continue
    w = consts.get(node.input[1])
    if w is None or w.ndim != 2 or node.input[0] in consts:
      continue
    name = node.name or node.op_type
    w = np.asarray(w, np.float32)
    if node.op_type == 'Gemm':
      if _attr(node, 'transA', 0):
        continue   # The feature would be transposed: not a batch of rows.
      kernel = (w.T if _attr(node, 'transB', 0) else w) * _attr(node, 'alpha',
                                                              1.0)
      bias = np.zeros(kernel.shape[1], np.float32)
      if len(node.input) > 2 and node.input[2]:
        c = consts.get(node.input[2])
        if c is None or c.size not in (1, kernel.shape[1]):
          continue
        bias = bias + np.ravel(c).astype(np.float32) * _attr(node, 'beta', 1.0)
      found.append(HeadNode(node.input[0], kernel, bias, node.output[0], name))
      continue
    kernel, bias, out = w, np.zeros(w.shape[1], np.float32), node.output[0]
    after = consumers.get(out, [])
    if len(after) == 1 and after[0].op_type == 'Add':
      other = [i for i in after[0].input if i != out]
      c = consts.get(other[0]) if len(other) == 1 else None
      if c is not None and c.size in (1, w.shape[1]):
        bias = bias + np.ravel(c).astype(np.float32)
        out = after[0].output[0]
    found.append(HeadNode(node.input[0], kernel, bias, out, name))
  return found


def find_head(model, feature_tensor: str = '',
              what: str = 'teacher_from_onnx') -> HeadNode:
  """The head whose input is the feature: by default the Gemm / MatMul(+Add)
  that makes the graph's (first) output, through Identity / Softmax / Cast;
  with `feature_tensor` the one that reads it (maybe through a Flatten or
  Reshape).

  Raises:
    TCNError naming the candidates when there is no such node or the named
    tensor is not (uniquely) the input of one.
  """
  graph = model.graph
  heads = head_candidates(model)
  names = sorted({h.feature for h in heads})
  if not heads:
    ops = sorted({n.op_type for n in graph.node})
    raise TCNError(f'{what}: the ONNX graph has no Gemm or MatMul node with '
                   f'constant weights to be its output layer (its ops: '
                   f'{", ".join(ops) or "none"}); the TCN needs a dense '
                   'output layer')
  producers = {o: n for n in graph.node for o in n.output}
  out = graph.output[0].name
  t = out
  while t in producers and producers[t].op_type in _PASS_OPS:
    t = producers[t].input[0]
  final = [h for h in heads if h.out == t]
  if feature_tensor:
    sources = {}   # Head input -> the tensors it is a flattening of.
    for h in heads:
      t = h.feature
      sources.setdefault(t, {t})
      while t in producers and producers[t].op_type in _FLAT_OPS:
        t = producers[t].input[0]
        sources[h.feature].add(t)
    chosen = [h for h in heads if feature_tensor in sources[h.feature]]
    if len(chosen) != 1:
      why = ('is the input of no' if not chosen else
             f'is the input of {len(chosen)}')
      raise TCNError(f'{what}: feature tensor {feature_tensor!r} {why} Gemm/'
                     'MatMul node with constant weights; candidates (inputs '
                     f'of such nodes): {", ".join(names)}')
    if len(final) == 1 and chosen[0].out != final[0].out:
      raise TCNError(f'{what}: feature tensor {feature_tensor!r} is read by '
                     f'{chosen[0].node!r}, which does not make the graph\'s '
                     f'output {out!r}; the output layer {final[0].node!r} '
                     f'reads {final[0].feature!r}')
    return chosen[0]
  if len(final) != 1:
    op = producers[t].op_type if t in producers else 'graph input'
    raise TCNError(f'{what}: the graph\'s output {out!r} is made by a {op} '
                   'node, not by a Gemm or MatMul(+Add) with constant weights; '
                   'name the output layer\'s input with '
                   'config.teacher.feature_tensor (feature_tensor=), one of: '
                   f'{", ".join(names)}')
  return final[0]


def _dims(value_info) -> list:
  shape = value_info.type.tensor_type.shape
  return [d.dim_value if d.HasField('dim_value') else None for d in shape.dim]


def choose_layout(layout: str, graph_dims: list, data_shape: tuple,
                  what: str = 'teacher_from_onnx') -> str:
  """'NCHW', 'NHWC', 'flat' or 'same' for data examples of `data_shape`
  (the library's NHWC) and a graph input of dims (batch first; None for a
  named or unknown axis)."""
  layout = layout or 'auto'
  if layout not in LAYOUTS:
    raise TCNError(f'{what}: input_layout must be one of {", ".join(LAYOUTS)}'
                   f', got {layout!r}')
  want = graph_dims[1:]
  data_shape = tuple(int(d) for d in data_shape)

  def match(shape):
    return len(shape) == len(want) and all(
        w is None or w == s for w, s in zip(want, shape))
  if layout != 'auto':
    if len(data_shape) != 3 and layout == 'NCHW':
      raise TCNError(f'{what}: input_layout NCHW needs image data (H, W, C); '
                     f'the data give {data_shape}')
    shape = (data_shape if layout == 'NHWC' else
             (data_shape[2],) + data_shape[:2])
    if not match(shape):
      raise TCNError(f'{what}: the ONNX graph takes inputs of shape '
                     f'{_fmt(graph_dims)}, the data give {shape} in '
                     f'{layout} (the library\'s batches are NHWC: '
                     f'{data_shape}); change config.data.image_size / '
                     'channels or config.teacher.input_layout')
    return layout
  if len(data_shape) == 3:
    h, w, c = data_shape
    if match((c, h, w)) and not match((h, w, c)):
      return 'NCHW'
    if match((h, w, c)):
      return 'NHWC'
  elif match(data_shape):
    return 'same'
  if len(want) == 1 and want[0] == int(np.prod(data_shape)):
    return 'flat'
  hint = ''
  if len(data_shape) == 3 and len(want) == 3:
    hint = (f' (it reads {_fmt(graph_dims)} as NCHW: C={want[0]}, '
            f'H={want[1]}, W={want[2]})' if want[0] in (1, 3) else '')
  raise TCNError(f'{what}: the ONNX graph takes inputs of shape '
                 f'{_fmt(graph_dims)}{hint}, the data give {data_shape} (the '
                 "library's batches are NHWC, transposed to NCHW when the "
                 'graph asks for it); change config.data.image_size / '
                 'config.data.channels to match, or set '
                 'config.teacher.input_layout')


def _fmt(dims):
  return '(' + ', '.join('N' if d is None else str(d) for d in dims) + ')'


def check_scale(x: np.ndarray, prepared: np.ndarray, mean, std) -> str:
  """A warning ('' if none) when the first batch looks wrongly scaled for
  the model: raw 0..255 pixels, statistics in the other unit than the data,
  or inputs far from a normalized range after scaling."""
  x = np.asarray(x, np.float32)
  hi = float(np.max(np.abs(x))) if x.size else 0.0
  p_hi = float(np.max(np.abs(prepared))) if prepared.size else 0.0
  if std is not None and hi <= 1.0 and float(np.min(std)) > 2.0:
    return ('the data are in [0, 1] but config.teacher.input_std is '
            f'{std.tolist()} (0..255 units?): divide the statistics by 255')
  if mean is not None and hi > 2.0 and float(np.max(np.abs(mean))) <= 1.0:
    return (f'the data reach {hi:.0f} (0..255 pixels?) but config.teacher.'
            f'input_mean is {mean.tolist()} (0..1 units): scale the data or '
            'the statistics')
  if p_hi > 50.0:
    return (f'the teacher\'s inputs reach {p_hi:.0f} after input_mean / '
            'input_std: most models expect scaled inputs (set config.teacher.'
            'input_mean / input_std to the model\'s preprocessing)')
  return ''


@dataclasses.dataclass(frozen=True, eq=False)
class OnnxTeacher(FunctionTeacher):
  """A `FunctionTeacher` run by onnxruntime on the host.

  Attributes (beyond FunctionTeacher's):
    run_host: (x NHWC numpy) -> (graph output, feature) numpy, one call of
      the session for both.
    info: what results.json records: path, digest, feature tensor, head
      node, layout, input name and shape, mean, std.
  """
  run_host: Callable[[Any], Any] = None
  info: dict = None

  def host_features(self, x):
    """(N, D) features of NHWC batch x, numpy in and out (no XLA: what
    `teacher_features` and the features stage call, on a mesh too)."""
    return self.run_host(x)[1]

  def host_logits(self, x):
    """The graph's output for NHWC batch x, numpy in and out."""
    return self.run_host(x)[0]


def teacher_from_onnx(path: str, *, x_example, feature_tensor: str = '',
                      input_layout: str = 'auto', input_mean=None,
                      input_std=None, threads: int = 0,
                      what: str = 'teacher_from_onnx'):
  """An ONNX model (any framework's export) as a teacher.

  Args:
    path: the `.onnx` file.
    x_example: a few inputs (N, ...) of the data, NHWC images in the
      library's scaling; used to choose the layout and check the head.
    feature_tensor: the feature: the name of the tensor the output layer
      reads (default: the input of the graph's final Gemm / MatMul(+Add)).
    input_layout: 'auto' (NCHW when the graph's input shape is the data's
      (C, H, W)), 'NCHW' or 'NHWC'.
    input_mean, input_std: per-channel (or scalar) statistics; inputs are
      (x - mean) / std before the graph (default: unchanged). Numbers, a
      sequence or a string '0.485,0.456,0.406'.
    threads: onnxruntime's intra-op threads (0: its default).
    what: how errors name the caller.

  Returns:
    (teacher, variables): an `OnnxTeacher` and {'model': {}, 'params':
    {'head': {'out': {'kernel', 'bias'}}}}, for `teacher_features`,
    `teacher_head` and `TCN`, as `function_teacher` gives.

  Raises:
    TCNError (one line) when the graph has no dense head, the named tensor
    is not its input, the input shape does not fit the data, or the head
    does not reproduce the graph's output on x_example.
  """
  onnx, ort = _imports()
  model = _load(path)
  graph = model.graph
  head = find_head(model, feature_tensor, what)
  inits = {t.name for t in graph.initializer}
  graph_inputs = [i for i in graph.input if i.name not in inits]
  if len(graph_inputs) != 1:
    raise TCNError(f'{what}: the ONNX graph takes {len(graph_inputs)} inputs '
                   f'({", ".join(i.name for i in graph_inputs)}); a teacher '
                   'takes one (the images)')
  inp = graph_inputs[0]
  dims = _dims(inp)
  x_example = np.asarray(x_example)
  layout = choose_layout(input_layout, dims, x_example.shape[1:], what)
  mean = parse_floats('input_mean (config.teacher.input_mean)', input_mean)
  std = parse_floats('input_std (config.teacher.input_std)', input_std)
  if std is not None and np.any(std == 0):
    raise TCNError('input_std (config.teacher.input_std) must be non-zero, '
                   f'got {std.tolist()}')
  channels = x_example.shape[-1] if x_example.ndim == 4 else 1
  for name, v in (('input_mean (config.teacher.input_mean)', mean),
                  ('input_std (config.teacher.input_std)', std)):
    if v is not None and v.size not in (1, channels):
      raise TCNError(f'{name} has {v.size} values, the data {channels} '
                     'channels: give one value or one per channel')
  elem = inp.type.tensor_type.elem_type
  in_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else np.float32
  fixed_batch = dims[0] if dims and dims[0] else None

  outputs = [o.name for o in graph.output]
  if head.feature not in outputs:
    feat_type = onnx.TensorProto.FLOAT
    try:
      inferred = onnx.shape_inference.infer_shapes(model)
      for v in inferred.graph.value_info:
        if v.name == head.feature and v.type.tensor_type.elem_type:
          feat_type = v.type.tensor_type.elem_type
    except Exception:  # pylint: disable=broad-except
      pass
    graph.output.append(onnx.helper.make_tensor_value_info(
        head.feature, feat_type, None))
  options = ort.SessionOptions()
  if threads:
    options.intra_op_num_threads = int(threads)
  session = ort.InferenceSession(model.SerializeToString(), options,
                                 providers=['CPUExecutionProvider'])
  wanted = [outputs[0], head.feature]

  def prepare(x):
    x = np.asarray(x, np.float32)
    if mean is not None:
      x = x - mean
    if std is not None:
      x = x / std
    if layout == 'NCHW':
      x = x.transpose(0, 3, 1, 2)
    elif layout == 'flat':
      x = x.reshape(len(x), -1)
    return np.ascontiguousarray(x, in_dtype)

  def run_host(x):
    """(graph output, feature) of NHWC batch x, float32 numpy."""
    x = prepare(x)
    n = len(x)
    step = fixed_batch or max(n, 1)
    outs, feats = [], []
    for s in range(0, n, step):
      xb = x[s:s + step]
      pad = step - len(xb)
      if pad:   # A graph exported with a fixed batch size.
        xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
      o, f = session.run(wanted, {inp.name: xb})
      outs.append(np.asarray(o, np.float32)[:step - pad])
      feats.append(np.asarray(f, np.float32).reshape(len(xb), -1)[:step - pad])
    return np.concatenate(outs), np.concatenate(feats)

  logits, feats = run_host(x_example)
  warning = check_scale(x_example, prepare(x_example), mean, std)
  if warning:
    logging.warning('%s: %s', what, warning)
  num_classes = head.kernel.shape[1]
  if feats.shape[1] != head.kernel.shape[0]:
    raise TCNError(f'{what}: feature {head.feature!r} has {feats.shape[1]} '
                   f'values per example, the output layer {head.node!r} reads '
                   f'{head.kernel.shape[0]}')
  if logits.ndim != 2 or logits.shape[1] != num_classes:
    raise TCNError(f'{what}: the graph\'s output {outputs[0]!r} has shape '
                   f'{logits.shape}, not (N, {num_classes}) as its output '
                   f'layer {head.node!r}')
  _check_head(feats, logits, head, what)

  def host(fn_index):
    def call(x):
      return run_host(np.asarray(x))[fn_index]
    return call

  def apply_fn(v, x):
    del v
    return jax.pure_callback(
        host(0), jax.ShapeDtypeStruct((x.shape[0], num_classes), jnp.float32),
        x, vmap_method='sequential')

  def feature_fn(v, x):
    del v
    return jax.pure_callback(
        host(1), jax.ShapeDtypeStruct((x.shape[0], head.kernel.shape[0]),
                                      jnp.float32),
        x, vmap_method='sequential')

  info = {'path': path, 'digest': file_digest(path),
          'feature_tensor': head.feature, 'head_node': head.node,
          'output': outputs[0], 'input': inp.name, 'input_shape': _fmt(dims),
          'layout': layout,
          'params': int(sum(int(np.prod(t.dims)) for t in graph.initializer)),
          'input_mean': None if mean is None else mean.tolist(),
          'input_std': None if std is None else std.tolist()}
  teacher = OnnxTeacher(apply_fn, feature_fn, int(num_classes),
                        run_host=run_host, info=info)
  variables = {'model': {}, 'params': {'head': {'out': {
      'kernel': jnp.asarray(head.kernel), 'bias': jnp.asarray(head.bias)}}}}
  return teacher, variables


def _check_head(feats, out, head: HeadNode, what: str):
  """The graph's output is ReLU(feature) @ kernel + bias (or its softmax),
  the TCN head's function."""
  def close(y):
    scale = max(1.0, float(np.abs(out).max()))
    return float(np.abs(out - y).max()) <= 1e-3 * scale

  def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)
  logits = np.maximum(feats, 0) @ head.kernel + head.bias
  if close(logits) or close(softmax(logits)):
    return
  raw = feats @ head.kernel + head.bias
  if close(raw) or close(softmax(raw)):
    raise TCNError(f'{what}: feature {head.feature!r} takes negative values: '
                   'the TCN head is ReLU -> Dense, so the feature must be the '
                   'output of a ReLU (name one with feature_tensor)')
  raise TCNError(f'{what}: the graph\'s output is not its output layer '
                 f'{head.node!r} applied to feature {head.feature!r}; name '
                 'the output layer\'s input with feature_tensor')
