"""The Python API's input contract, checked at every public entry point.

- Inputs (`x`, `images`): an array (N, ...) of N >= 1 examples, channels
  last: images (N, H, W, C), sequences (N, L, C); for a network whose first
  layer is an embedding (`Emb...`), token ids (N, L) of an integer type in
  [0, vocabulary). Where the network's input shape is known (a TCN whose
  students came from `train_students`, a saved TCN, the other splits of a
  dataset) each example must have it; otherwise it must fit the network's
  parameters.
- Values: float arrays hold finite values in [0, 1], as `load_dataset`
  gives them; float32 is used as it is, other float widths (float16,
  bfloat16, float64) are converted to float32 (the networks' input dtype);
  uint8 arrays are pixels 0..255, scaled as the data loader scales them
  (`x.astype(float32) / 255`); any other dtype is refused.
- Features (teacher features, PCA coefficients): float (N, D), finite, one
  row per input. Labels: integers (N,) in [0, num_classes), one per input.
- epochs: an integer >= 0; counts (num_students): an integer >= 1.
- evaluate: labels in [0, the network's number of outputs).

Every violation is one `TCNError` naming the function and the argument,
raised before any work. Inside a jitted function (tracers) only shapes and
dtypes are checked.
"""
import jax
import jax.numpy as jnp
import numpy as np

from tcn_jax import input_pipeline
from tcn_jax import models
from tcn_jax.errors import TCNError

LAYOUT = 'channels last: (N, H, W, C) images or (N, L, C) sequences'


def _array(where, name, x):
  if isinstance(x, (jax.Array, np.ndarray)):
    return x
  try:
    return np.asarray(x)
  except TCNError:   # A stop signal (Interrupted).
    raise
  except Exception as e:  # pylint: disable=broad-except  (ragged lists, ...)
    raise TCNError(f'{where}: {name} is not an array ({type(e).__name__}: '
                   f'{e})') from None


def _traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def vocabulary(spec: str | None) -> int:
  """The vocabulary of a network whose first layer is an embedding, else 0."""
  first = models.parse(spec)[:1] if spec else []
  return first[0]['vocab'] if first and first[0]['kind'] == 'embed' else 0


def _shape_hint(got, want):
  """How a common mistake with `want` gives `got`, or ''."""
  if len(want) == 3 and got == (want[2], want[0], want[1]):
    return '; these look channels first (NCHW): use x.transpose(0, 2, 3, 1)'
  if got == want[:-1] and want[-1] == 1:
    return '; the channel axis is missing: use x[..., None]'
  return ''


def batch(where: str, name: str, x, *, spec: str | None = None,
          shape=None):
  """`x` checked against the contract: uint8 pixels scaled to float32 in
  [0, 1], everything else returned unchanged.

  Args:
    where: the function, for the error ('predict', 'train_students', ...).
    name: the argument ('images', 'x', 'ds.test.x', ...).
    x: the inputs.
    spec: the network's architecture string (token ids when it starts with
      an embedding); None: not known (integers other than uint8 are taken as
      token ids).
    shape: the per-example shape the network takes, when known.
  """
  if isinstance(x, input_pipeline.Stream):   # Checked as it is read.
    return x
  x = _array(where, name, x)
  if x.ndim < 2:
    raise TCNError(f'{where}: {name} must be a batch (N, ...) of inputs, '
                   f'{LAYOUT}; got shape {tuple(x.shape)}')
  if shape is not None and tuple(x.shape[1:]) != tuple(shape):
    want = tuple(shape)
    raise TCNError(f'{where}: {name} has shape {tuple(x.shape)}; this '
                   f'network takes (N, {", ".join(map(str, want))}), '
                   f'{LAYOUT}{_shape_hint(tuple(x.shape[1:]), want)}')
  if isinstance(x.shape[0], int) and not x.shape[0]:   # Not symbolic.
    raise TCNError(f'{where}: {name} is an empty batch (0 examples); give '
                   'at least one')
  if any(isinstance(d, int) and not d for d in x.shape[1:]):
    raise TCNError(f'{where}: {name} has shape {tuple(x.shape)}: its examples '
                   f'are empty (a 0-length axis); inputs are {LAYOUT}')
  vocab = vocabulary(spec)
  kind = x.dtype
  if vocab or (spec is None and jnp.issubdtype(kind, jnp.integer)
               and kind != np.uint8):
    if not jnp.issubdtype(kind, jnp.integer) or kind == bool:
      raise TCNError(f'{where}: {name} must be integer token ids for this '
                     f'network (it starts with an embedding); got {kind}')
    if vocab and not _traced(x) and len(x):
      lo, hi = int(_xp(x).min(x)), int(_xp(x).max(x))
      if lo < 0 or hi >= vocab:
        raise TCNError(f'{where}: {name} holds token ids {lo}..{hi}, '
                       f'outside the vocabulary [0, {vocab})')
    return x
  if kind == np.uint8:   # Pixels: the data loader's scaling.
    return x.astype(np.float32) / (255.0 if isinstance(x, np.ndarray)
                                   else jnp.float32(255.0))
  if not jnp.issubdtype(kind, jnp.floating):
    raise TCNError(f'{where}: {name} has dtype {kind}; give float images in '
                   '[0, 1] (as tcn.load_dataset does) or uint8 pixels 0..255')
  if not _traced(x):
    xp = _xp(x)
    if not bool(xp.all(xp.isfinite(x))):
      bad = int(xp.sum(~xp.isfinite(x)))
      raise TCNError(f'{where}: {name} holds {bad} non-finite values (NaN '
                     'or inf)')
    lo, hi = float(xp.min(x)), float(xp.max(x))
    if lo < 0 or hi > 1:
      raise TCNError(f'{where}: {name} holds values in [{lo:g}, {hi:g}]; '
                     'images must be floats in [0, 1] (divide 0..255 pixels '
                     'by 255, or pass them as uint8)')
  if kind != np.float32:   # float16, bfloat16, float64: the input dtype.
    return x.astype(np.float32) if isinstance(x, np.ndarray) else (
        x.astype(jnp.float32))
  return x


def fits(where: str, name: str, x, fn, cache: dict | None = None):
  """TCNError unless `fn` (the network with its parameters) applies to one
  example of `x`'s shape; `cache` keeps shapes already found to fit."""
  key = (tuple(x.shape[1:]), str(x.dtype))
  if cache is not None and key in cache:
    return
  try:
    jax.eval_shape(fn, jax.ShapeDtypeStruct((1, *key[0]), x.dtype))
  except TCNError:   # A stop signal (Interrupted) is not a shape error.
    raise
  except Exception as e:  # pylint: disable=broad-except  (Flax / XLA types)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    got = tuple(x.shape)
    hint = ''
    if len(got) == 4 and got[1] in (1, 3) and got[3] not in (1, 3):
      hint = '; these look channels first (NCHW): use x.transpose(0, 2, 3, 1)'
    elif len(got) == 3:
      hint = '; for single-channel images add the channel axis: x[..., None]'
    raise TCNError(f'{where}: {name} of shape {got} does not fit the '
                   f"network's parameters ({first}); inputs are {LAYOUT}"
                   f'{hint}') from None
  if cache is not None:
    cache[key] = True


def features(where: str, name: str, f, rows: int, width: int | None = None):
  """Float (rows, D) targets, finite (D = `width` when given)."""
  f = _array(where, name, f)
  if f.ndim != 2 or len(f) != rows or (width is not None
                                       and f.shape[1] != width):
    want = f'({rows}, {width if width is not None else "D"})'
    raise TCNError(f'{where}: {name} has shape {tuple(f.shape)}; expected '
                   f'{want}: one row of features per input')
  if not jnp.issubdtype(f.dtype, jnp.floating):
    raise TCNError(f'{where}: {name} must be floats, got {f.dtype}')
  if not _traced(f) and not bool(_xp(f).all(_xp(f).isfinite(f))):
    raise TCNError(f'{where}: {name} holds non-finite values (NaN or inf)')
  return f


def labels(where: str, name: str, y, rows: int, num_classes: int | None):
  """Integer (rows,) labels in [0, num_classes)."""
  y = _array(where, name, y)
  if y.ndim != 1 or len(y) != rows:
    raise TCNError(f'{where}: {name} has shape {tuple(y.shape)}; expected '
                   f'({rows},): one integer label per input')
  if not jnp.issubdtype(y.dtype, jnp.integer) or y.dtype == bool:
    raise TCNError(f'{where}: {name} must be integer labels, got {y.dtype}')
  if num_classes and len(y) and not _traced(y):
    lo, hi = int(_xp(y).min(y)), int(_xp(y).max(y))
    if lo < 0 or hi >= num_classes:
      raise TCNError(f'{where}: {name} holds labels {lo}..{hi}, outside '
                     f'[0, {num_classes})')
  return y


def count(where: str, name: str, value):
  """A count of things to make (num_students): an integer >= 1."""
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise TCNError(f'{where}: {name} must be an integer >= 1, got {value!r}')
  return int(value)


def epochs(where: str, value):
  """An epoch count: an integer >= 0."""
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 0):
    raise TCNError(f'{where}: epochs must be an integer >= 0, got {value!r}')
  return int(value)


def dataset(where: str, ds, *, spec: str | None, num_classes: int | None,
            shape=None, splits=('train', 'val', 'test')):
  """A `data.Dataset`'s splits checked as `batch` and `labels`, all of one
  example shape (`shape`, or train's); returns a dataset with uint8 pixels
  scaled."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  out = {}
  for s in splits:
    split = getattr(ds, s)
    x = batch(where, f'ds.{s}.x', split.x, spec=spec, shape=shape)
    shape = tuple(x.shape[1:])
    y = labels(where, f'ds.{s}.y', split.y, len(x), num_classes)
    out[s] = dataclasses.replace(split, x=x, y=y)
  return dataclasses.replace(ds, **out)
