"""Teacher, student and head networks, built from short architecture strings.

Architectures are data (config strings in the reference notation), not code:

  C32       Conv 3x3 'valid' + ReLU, 32 filters      C5-32   the same, 5x5 kernel
  C32s2     ... stride 2                              C32same ... 'same' padding
  C32lin    ... without the ReLU (any C token)        ELU     ELU activation
  MP        MaxPool 2 'valid'                          MPsame  MaxPool 2 'same'
  MP3s2     MaxPool 3, stride 2 (window k, stride s)   ZP3     zero padding 3 per side
  Do.25     Dropout 0.25                               F       Flatten
  D256r     Dense 256 + ReLU                           D256    Dense 256, linear
  BN        BatchNorm (epsilon 1e-3)                   R       ReLU
  BN1.001e-5  BatchNorm with that epsilon
  Emb1000-32  Embedding (vocabulary 1000, width 32)
  RB64s2    ResNet basic block (two 3x3 convs), 64 filters, stride 2
  BB64      ResNet bottleneck block (1x1, 3x3, 1x1 to 4x64 filters), the
            stride in the 3x3 (ResNet v1.5)
  BB64s2k   ... as keras.applications' ResNet: the stride in the first 1x1,
            BatchNorm epsilon 1.001e-5 (RB64k: that epsilon)
  GAP       global average pooling over all spatial axes
  CAFFE     [0, 1] RGB images to keras.applications' ResNet input ('caffe'
            preprocess_input: 0-255, BGR, ImageNet mean subtracted)

Convolutions work on images (NHWC) and sequences (NLC) alike. `dtype` is the
compute dtype (mixed precision, e.g. bfloat16): parameters stay float32, each
layer computes in `dtype`, and a Net returns float32. Models with BN
layers carry a 'batch_stats' collection besides 'params'; the library passes
whole Flax variable dicts around for that reason.
"""
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcn_jax import layers

INITS = {
    'glorot_uniform': nn.initializers.glorot_uniform(),
    'lecun_normal': nn.initializers.lecun_normal(),
    'he_uniform': nn.initializers.he_uniform(),
    'normal': nn.initializers.normal(0.05),   # Keras 'normal' = N(0, 0.05).
}



def _keras_embedding_init(key, shape, dtype=jnp.float32):
  return jax.random.uniform(key, shape, dtype, -0.05, 0.05)


_TOKEN = re.compile(
    r'^(?:C(?:(?P<ck>\d+)-)?(?P<cf>\d+)(?:s(?P<cs>\d+))?(?P<csame>same)?'
    r'(?P<clin>lin)?'
    r'|(?P<mp>MP)(?P<mpk>\d+)?(?:s(?P<mps>\d+))?(?P<mpsame>same)?'
    r'|ZP(?P<zp>\d+)|Do(?P<do>[\d.]+)|(?P<f>F)'
    r'|(?:D|Out)(?P<d>\d+)(?P<dr>r)?|(?P<bn>BN)(?P<bneps>\d[\d.]*e-?\d+)?'
    r'|(?P<r>R)|(?P<elu>ELU)'
    r'|(?P<gap>GAP)|(?P<block>RB|BB)(?P<bf>\d+)(?:s(?P<bs>\d+))?(?P<bk>k)?'
    r'|Emb(?P<ev>\d+)-(?P<ed>\d+)|(?P<caffe>CAFFE))$')


def parse(spec: str) -> list[dict[str, Any]]:
  """Parses an architecture string into layer dicts; raises on unknown tokens."""
  out = []
  for tok in spec.split():
    m = _TOKEN.match(tok)
    if not m:
      raise ValueError(f'unknown layer {tok!r} in architecture {spec!r}')
    g = m.groupdict()
    if g['cf']:
      out.append(dict(kind='conv', features=int(g['cf']),
                      kernel=int(g['ck'] or 3), stride=int(g['cs'] or 1),
                      padding='SAME' if g['csame'] else 'VALID',
                      relu=not g['clin']))
    elif g['mp']:
      window = int(g['mpk'] or 2)
      out.append(dict(kind='pool', padding='SAME' if g['mpsame'] else 'VALID',
                      window=window, stride=int(g['mps'] or window)))
    elif g['zp']:
      out.append(dict(kind='zeropad', pad=int(g['zp'])))
    elif g['do']:
      rate = float(g['do']) if g['do'].count('.') <= 1 else -1.0
      if not 0 <= rate < 1:
        raise ValueError(f'dropout rate of {tok!r} in architecture {spec!r} '
                         'must be in [0, 1)')
      out.append(dict(kind='dropout', rate=rate))
    elif g['f']:
      out.append(dict(kind='flatten'))
    elif g['d']:
      out.append(dict(kind='dense', features=int(g['d']), relu=bool(g['dr'])))
    elif g['bn']:
      out.append(dict(kind='bn', epsilon=float(g['bneps'] or 1e-3)))
    elif g['r']:
      out.append(dict(kind='relu'))
    elif g['elu']:
      out.append(dict(kind='elu'))
    elif g['gap']:
      out.append(dict(kind='gap'))
    elif g['block']:
      out.append(dict(kind='bottleneck' if g['block'] == 'BB' else 'basic',
                      features=int(g['bf']), stride=int(g['bs'] or 1),
                      keras=bool(g['bk'])))
    elif g['caffe']:
      out.append(dict(kind='caffe'))
    else:
      out.append(dict(kind='embed', vocab=int(g['ev']), features=int(g['ed'])))
  return out


def batch_norm(x, train, dtype=None, epsilon=1e-3):
  """BatchNorm with Keras' defaults (momentum 0.99, epsilon 1e-3);
  statistics in float32 whatever `dtype`."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.99,
                      epsilon=epsilon, dtype=dtype)(x)


# keras.applications' ResNets use this BatchNorm epsilon.
KERAS_RESNET_EPSILON = 1.001e-5
# keras.applications.imagenet_utils 'caffe' mode: BGR means on 0-255 pixels.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class ResidualBlock(nn.Module):
  """ResNet v1 block: basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 to
  4x features), Conv -> BN -> ReLU, with a projection shortcut (1x1 conv +
  BN) where the shape changes. `keras`: keras.applications' layout (the
  bottleneck's stride in its first 1x1 convolution, BatchNorm epsilon
  1.001e-5), so its ResNet-50 weights load layer for layer."""
  features: int
  stride: int = 1
  bottleneck: bool = False
  kernel_init: Any = nn.initializers.he_uniform()
  impl: str = 'auto'
  dtype: Any = None
  keras: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    nd = x.ndim - 2

    def conv(y, features, k, stride=1):
      return layers.Conv(features, (k,) * nd, (stride,) * nd, 'SAME',
                         kernel_init=self.kernel_init, impl=self.impl,
                         dtype=self.dtype)(y)

    eps = KERAS_RESNET_EPSILON if self.keras else 1e-3
    if self.bottleneck and self.keras:
      plan = [(self.features, 1, self.stride), (self.features, 3, 1),
              (4 * self.features, 1, 1)]
    elif self.bottleneck:
      plan = [(self.features, 1, 1), (self.features, 3, self.stride),
              (4 * self.features, 1, 1)]
    else:
      plan = [(self.features, 3, self.stride), (self.features, 3, 1)]
    y = x
    for i, (features, k, stride) in enumerate(plan):
      y = batch_norm(conv(y, features, k, stride), train, self.dtype, eps)
      y = nn.relu(y) if i < len(plan) - 1 else y
    if x.shape != y.shape:
      x = batch_norm(conv(x, plan[-1][0], 1, self.stride), train, self.dtype,
                     eps)
    return nn.relu(x + y)


class Net(nn.Module):
  """A plain feed-forward network described by an architecture string.

  Attributes:
    spec: e.g. 'C32 C32 MP C16 C16 MP Do.25 F D16r Do.3' (the tokens are
      listed at the top of this module).
    initializer: the kernels' initializer's name (`INITS`).
    impl: convolutions as 'im2col' matmuls, 'xla' convolutions, or 'auto'.
  """
  spec: str
  initializer: str = 'glorot_uniform'
  impl: str = 'auto'
  dtype: Any = None   # Compute dtype; None: float32 throughout.

  @nn.compact
  def __call__(self, x, train: bool = False):
    kinit = INITS[self.initializer]
    dt = self.dtype
    if dt is not None and jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(dt)
    for layer in parse(self.spec):
      kind = layer['kind']
      if kind == 'conv':
        nd = x.ndim - 2
        x = layers.Conv(layer['features'], (layer['kernel'],) * nd,
                        (layer['stride'],) * nd, layer['padding'],
                        kernel_init=kinit, impl=self.impl, dtype=dt)(x)
        x = nn.relu(x) if layer['relu'] else x
      elif kind == 'pool':
        x = layers.max_pool(x, layer['window'], layer['padding'], self.impl,
                            layer['stride'])
      elif kind == 'zeropad':
        p = layer['pad']
        x = jnp.pad(x, [(0, 0)] + [(p, p)] * (x.ndim - 2) + [(0, 0)])
      elif kind == 'dropout':
        x = nn.Dropout(layer['rate'], deterministic=not train)(x)
      elif kind == 'flatten':
        x = x.reshape(x.shape[0], -1)
      elif kind == 'dense':
        x = nn.Dense(layer['features'], kernel_init=kinit, dtype=dt)(x)
        x = nn.relu(x) if layer['relu'] else x
      elif kind == 'bn':
        x = batch_norm(x, train, dt, layer['epsilon'])
      elif kind == 'relu':
        x = nn.relu(x)
      elif kind == 'elu':
        x = nn.elu(x)
      elif kind == 'gap':
        x = x.mean(axis=tuple(range(1, x.ndim - 1)))
      elif kind in ('basic', 'bottleneck'):
        x = ResidualBlock(layer['features'], layer['stride'],
                          kind == 'bottleneck', kinit, self.impl, dt,
                          layer['keras'])(x, train)
      elif kind == 'caffe':
        x = x[..., ::-1] * 255.0 - jnp.asarray(CAFFE_MEAN_BGR, x.dtype)
      elif kind == 'embed':
        x = nn.Embed(layer['vocab'], layer['features'], dtype=dt,
                     embedding_init=_keras_embedding_init)(x)
    return x if dt is None else x.astype(jnp.float32)


class Head(nn.Module):
  """The classifier on top of the feature: ReLU -> [BN] -> Dropout -> Dense.

  The same module is the teacher's output layer and the TCN head, so the
  teacher's weights copy over unchanged. The paper's MNIST-style teachers
  output a post-ReLU feature, where the leading ReLU is the identity; the
  CIFAR-10 teacher has the BatchNorm (`bn=True`).

  Attributes:
    num_classes: the outputs (logits).
    dropout: the dropout rate before the Dense (training only).
    initializer: the kernel's initializer's name (`INITS`).
    bn: a BatchNorm after the ReLU.
  """
  num_classes: int
  dropout: float = 0.5
  initializer: str = 'glorot_uniform'
  bn: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, feature, train: bool = False):
    x = nn.relu(feature if self.dtype is None else feature.astype(self.dtype))
    if self.bn:
      x = batch_norm(x, train, self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=INITS[self.initializer],
                 name='out', dtype=self.dtype)(x)
    return x if self.dtype is None else x.astype(jnp.float32)


class Teacher(nn.Module):
  """Body (ending in the feature layer) followed by the output Head.

  Attributes:
    body: the architecture string up to and including the feature layer,
      e.g. 'C32 C64 MP Do.25 F D256r D256r' (a 256-wide feature).
    num_classes: the outputs (logits).
    head_dropout: the head's dropout rate.
    impl: convolutions as 'im2col' matmuls, 'xla' convolutions, or 'auto'.
    head_bn: a BatchNorm in the head (the CIFAR-10 teacher).
  """
  body: str
  num_classes: int
  head_dropout: float = 0.5
  impl: str = 'auto'
  head_bn: bool = False
  dtype: Any = None

  def setup(self):
    self.trunk = Net(self.body, 'glorot_uniform', self.impl, self.dtype)
    self.head = Head(self.num_classes, self.head_dropout, bn=self.head_bn,
                     dtype=self.dtype)

  def __call__(self, x, train: bool = False):
    return self.head(self.trunk(x, train), train)

  def features(self, x):
    """The dense feature the students regress (inference mode)."""
    return self.trunk(x, False)


# Compute dtypes by config name (`config.dtype`); None: float32 throughout.
COMPUTE_DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}


def compute_dtype(config):
  """The compute dtype a resolved config asks for (None: float32)."""
  return COMPUTE_DTYPES[config.dtype]


def submodule_variables(variables, name: str):
  """The variables of submodule `name` (e.g. a teacher's 'head'), every
  collection included: {'params': ..., 'batch_stats': ...}."""
  return {col: tree[name] for col, tree in variables.items() if name in tree}


def l2_penalty(params) -> jax.Array:
  """Sum of squared kernels (Keras-style L2 weight decay; biases and
  BatchNorm scales are not decayed)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(jnp.sum(x ** 2) for path, x in leaves
             if getattr(path[-1], 'key', None) == 'kernel')


def student(spec: str, out_dim: int, out_relu: bool = False,
            init: str = 'normal', impl: str = 'auto', dtype=None) -> Net:
  """A student: the trunk `spec` plus an output Dense of its chunk's width.

  Args:
    spec: the trunk's architecture string.
    out_dim: the width of the student's chunk.
    out_relu: a ReLU after the output Dense.
    init: the kernels' initializer's name (`INITS`).
    impl: convolutions as 'im2col' matmuls, 'xla' convolutions, or 'auto'.
    dtype: the compute dtype (None: float32; `COMPUTE_DTYPES`).

  Returns:
    The `Net` module.
  """
  return Net(f'{spec} D{out_dim}{"r" if out_relu else ""}', init, impl, dtype)


def output_shape(spec: str, input_shape, impl: str = 'auto',
                 dtype=jnp.float32) -> tuple:
  """Shape of `Net(spec)`'s output for one input of `input_shape` (token ids
  for an Emb first layer: dtype int32).

  Raises ValueError naming the first layer that cannot apply (e.g. more
  pooling or a larger kernel than the image allows).
  """
  tokens = spec.split()

  def shape(k):
    net = Net(' '.join(tokens[:k]), impl=impl)
    x = jax.ShapeDtypeStruct((1, *input_shape), dtype)
    out = jax.eval_shape(
        lambda x: net.init_with_output(jax.random.key(0), x)[0], x).shape
    if 0 in out:
      raise ValueError(f'empty output {out[1:]}')
    return out[1:]

  for k in range(len(tokens) + 1):
    try:
      out = shape(k)
    except Exception:  # Flax/XLA raise several types for bad shapes.
      raise ValueError(f'layer {k} ({tokens[k - 1]!r}) cannot apply to its '
                       f'input of shape {shape(k - 1)}') from None
  return out


def num_params(params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
