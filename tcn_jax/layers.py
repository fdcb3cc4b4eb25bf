"""Convolution and pooling layers with a CPU-fast path and the XLA reference path.

The parameters are the same as `flax.linen.Conv` (`kernel` of shape
(kh, kw, in, out) and `bias`), so checkpoints move freely between paths.
On XLA:CPU, convolution backward passes and `max_pool` backward are slow; an
explicit im2col convolution (shifted slices concatenated, one matmul) and
reshape-then-max pooling are several times faster there. GPU/TPU keep the
reference `lax.conv_general_dilated` / `nn.max_pool` path. Forward-only work
(predict, export) takes XLA's own path everywhere (`forward_impl`): without
a backward pass it is the faster one on the CPU too
(experiments/results/bench_serving_cpu.md).
"""
import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLS = ('auto', 'im2col', 'xla')


def resolve_impl(impl: str) -> str:
  """'auto' -> 'im2col' on CPU, 'xla' on GPU/TPU."""
  if impl not in IMPLS:
    raise ValueError(f'layers.impl must be one of {IMPLS}, got {impl!r}')
  if impl == 'auto':
    return 'im2col' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def forward_impl(impl: str) -> str:
  """The path for forward-only work: 'auto' -> 'xla' on every backend; an
  explicit 'im2col' or 'xla' is kept."""
  if impl not in IMPLS:
    raise ValueError(f'layers.impl must be one of {IMPLS}, got {impl!r}')
  return 'xla' if impl == 'auto' else impl


def stage_impl(layers_impl: str, forward: str = '') -> str:
  """The path of a pipeline stage's forward-only work (teacher features,
  frozen students, evaluation): `forward` ('auto' -> 'xla'), or with ''
  `layers_impl` as in training (the behaviour before the choice)."""
  return forward_impl(forward) if forward else layers_impl


def _pad(x, kernel_size, strides, padding, value=0.0):
  """Applies 'SAME' padding explicitly (as XLA does) so im2col can be 'VALID'."""
  if padding == 'VALID':
    return x
  if padding != 'SAME':
    raise ValueError(f'padding must be VALID or SAME, got {padding!r}')
  pads = []
  for size, k, s in zip(x.shape[1:-1], kernel_size, strides):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    pads.append((total // 2, total - total // 2))
  return jnp.pad(x, [(0, 0), *pads, (0, 0)], constant_values=value)


def conv_im2col(x, kernel, strides):
  """N-d 'VALID' convolution as one matmul over concatenated shifted slices."""
  ksize = kernel.shape[:-2]
  spatial = x.shape[1:-1]
  out = [(size - k) // s + 1 for size, k, s in zip(spatial, ksize, strides)]
  slices = []
  for offset in itertools.product(*(range(k) for k in ksize)):
    idx = tuple(slice(o, o + (n - 1) * s + 1, s)
                for o, n, s in zip(offset, out, strides))
    slices.append(x[(slice(None), *idx, slice(None))])
  patches = jnp.concatenate(slices, axis=-1)
  return patches @ kernel.reshape(-1, kernel.shape[-1])


class Conv(nn.Module):
  """`nn.Conv`-compatible convolution (NHWC / NLC) with a selectable kernel path."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | None = None
  padding: str = 'VALID'
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  impl: str = 'auto'
  dtype: Any = None   # Compute dtype (e.g. bfloat16); None: the inputs'.

  @nn.compact
  def __call__(self, x):
    ksize = tuple(self.kernel_size)
    strides = tuple(self.strides or (1,) * len(ksize))
    kernel = self.param('kernel', self.kernel_init,
                        (*ksize, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    if self.dtype is not None:   # Parameters stay float32; compute casts.
      x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    if resolve_impl(self.impl) == 'im2col':
      y = conv_im2col(_pad(x, ksize, strides, self.padding), kernel, strides)
    else:
      dims = 'NHWC' if len(ksize) == 2 else 'NWC'
      kdims = 'HWIO' if len(ksize) == 2 else 'WIO'
      y = jax.lax.conv_general_dilated(
          x, kernel, strides, self.padding,
          dimension_numbers=(dims, kdims, dims))
    return y + bias


def max_pool(x, window: int = 2, padding: str = 'VALID', impl: str = 'auto',
             stride: int | None = None):
  """Max pooling over all spatial axes (stride defaults to the window)."""
  nd = x.ndim - 2
  stride = stride or window
  if resolve_impl(impl) == 'xla':
    # Keyword arguments: jax2onnx's ONNX export replaces nn.max_pool with a
    # function that takes only these (same values, same results).
    return nn.max_pool(x, window_shape=(window,) * nd,
                       strides=(stride,) * nd, padding=padding)
  x = _pad(x, (window,) * nd, (stride,) * nd, padding, value=-jnp.inf)
  if stride != window:   # Overlapping windows: the max of shifted slices.
    out = [(size - window) // stride + 1 for size in x.shape[1:-1]]
    y = None
    for offset in itertools.product(range(window), repeat=nd):
      idx = tuple(slice(o, o + (n - 1) * stride + 1, stride)
                  for o, n in zip(offset, out))
      part = x[(slice(None), *idx, slice(None))]
      y = part if y is None else jnp.maximum(y, part)
    return y
  x = x[(slice(None), *(slice(0, s // window * window) for s in x.shape[1:-1]))]
  shape = [x.shape[0]]
  for s in x.shape[1:-1]:
    shape += [s // window, window]
  y = x.reshape(*shape, x.shape[-1])
  return y.max(axis=tuple(2 + 2 * i for i in range(nd)))
