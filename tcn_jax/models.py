"""Teacher, student and head networks, built from short architecture strings.

Architectures are data (config strings in the reference notation), not code:

  C32       Conv 3x3 'valid' + ReLU, 32 filters      C5-32   the same, 5x5 kernel
  C32s2     ... stride 2                              C32same ... 'same' padding
  MP        MaxPool 2 'valid'                          MPsame  MaxPool 2 'same'
  Do.25     Dropout 0.25                               F       Flatten
  D256r     Dense 256 + ReLU                           D256    Dense 256, linear
  BN        BatchNorm                                  R       ReLU
  Emb1000-32  Embedding (vocabulary 1000, width 32)

Convolutions work on images (NHWC) and sequences (NLC) alike.
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
    r'|(?P<mp>MP)(?P<mpsame>same)?|Do(?P<do>[\d.]+)|(?P<f>F)'
    r'|(?:D|Out)(?P<d>\d+)(?P<dr>r)?|(?P<bn>BN)|(?P<r>R)'
    r'|Emb(?P<ev>\d+)-(?P<ed>\d+))$')


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
                      padding='SAME' if g['csame'] else 'VALID'))
    elif g['mp']:
      out.append(dict(kind='pool', padding='SAME' if g['mpsame'] else 'VALID'))
    elif g['do']:
      out.append(dict(kind='dropout', rate=float(g['do'])))
    elif g['f']:
      out.append(dict(kind='flatten'))
    elif g['d']:
      out.append(dict(kind='dense', features=int(g['d']), relu=bool(g['dr'])))
    elif g['bn']:
      out.append(dict(kind='bn'))
    elif g['r']:
      out.append(dict(kind='relu'))
    else:
      out.append(dict(kind='embed', vocab=int(g['ev']), features=int(g['ed'])))
  return out


class Net(nn.Module):
  """A plain feed-forward network described by an architecture string."""
  spec: str
  initializer: str = 'glorot_uniform'
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = False):
    kinit = INITS[self.initializer]
    for layer in parse(self.spec):
      kind = layer['kind']
      if kind == 'conv':
        nd = x.ndim - 2
        x = layers.Conv(layer['features'], (layer['kernel'],) * nd,
                        (layer['stride'],) * nd, layer['padding'],
                        kernel_init=kinit, impl=self.impl)(x)
        x = nn.relu(x)
      elif kind == 'pool':
        x = layers.max_pool(x, 2, layer['padding'], self.impl)
      elif kind == 'dropout':
        x = nn.Dropout(layer['rate'], deterministic=not train)(x)
      elif kind == 'flatten':
        x = x.reshape(x.shape[0], -1)
      elif kind == 'dense':
        x = nn.Dense(layer['features'], kernel_init=kinit)(x)
        x = nn.relu(x) if layer['relu'] else x
      elif kind == 'bn':
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99,
                         epsilon=1e-3)(x)
      elif kind == 'relu':
        x = nn.relu(x)
      elif kind == 'embed':
        x = nn.Embed(layer['vocab'], layer['features'],
                     embedding_init=_keras_embedding_init)(x)
    return x


class Head(nn.Module):
  """The classifier on top of the feature: ReLU -> Dropout -> Dense (logits).

  The same module is the teacher's output layer and the TCN head, so the
  teacher's weights copy over unchanged. The paper's MNIST-style teachers
  output a post-ReLU feature, where the leading ReLU is the identity.
  """
  num_classes: int
  dropout: float = 0.5
  initializer: str = 'glorot_uniform'

  @nn.compact
  def __call__(self, feature, train: bool = False):
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(feature))
    return nn.Dense(self.num_classes, kernel_init=INITS[self.initializer],
                    name='out')(x)


class Teacher(nn.Module):
  """Body (ending in the feature layer) followed by the output Head."""
  body: str
  num_classes: int
  head_dropout: float = 0.5
  impl: str = 'auto'

  def setup(self):
    self.trunk = Net(self.body, 'glorot_uniform', self.impl)
    self.head = Head(self.num_classes, self.head_dropout)

  def __call__(self, x, train: bool = False):
    return self.head(self.trunk(x, train), train)

  def features(self, x):
    """The dense feature the students regress (inference mode)."""
    return self.trunk(x, False)


def student(spec: str, out_dim: int, out_relu: bool = False,
            init: str = 'normal', impl: str = 'auto') -> Net:
  """A student: the trunk `spec` plus an output Dense of its chunk's width."""
  return Net(f'{spec} D{out_dim}{"r" if out_relu else ""}', init, impl)


def output_shape(spec: str, input_shape, impl: str = 'auto') -> tuple:
  """Shape of `Net(spec)`'s output for one input of `input_shape`.

  Raises ValueError naming the first layer that cannot apply (e.g. more
  pooling or a larger kernel than the image allows).
  """
  tokens = spec.split()

  def shape(k):
    net = Net(' '.join(tokens[:k]), impl=impl)
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
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
