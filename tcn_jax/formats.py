"""Export formats by name (`config.export.formats`): each a writer of one
file holding the weights and the program, its file extension, and `load`,
its reader. Light (jax, numpy): the config checks names here without
importing the models or checkpoints (`tcn_jax.export` writes artifacts).

A new format is one writer registered in `FORMATS`, its extension in
`EXTENSIONS` and its reader in `load`.
"""
import importlib
import logging as py_logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tcn_jax.errors import TCNError
from tcn_jax.registry import Registry

FORMATS = Registry('export format', 'export.formats')
EXTENSIONS = {'stablehlo': '.stablehlo', 'onnx': '.onnx'}


def _optional(module: str):
  """An optional dependency (slow to import), or TCNError saying how to get
  it."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise TCNError(f"the onnx export format needs {module}: pip install -e "
                   "'.[onnx]'") from None


def _spec(shape, dtype):
  """The input's abstract value; a symbolic 'batch' axis if shape[0] is
  None."""
  if shape[0] is None:
    shape = (jax.export.symbolic_shape('batch')[0], *shape[1:])
  return jax.ShapeDtypeStruct(shape, dtype)


@FORMATS.register('stablehlo')
def _stablehlo(fn, shape, dtype, platforms=None) -> bytes:
  """A serialized `jax.export` artifact."""
  exported = jax.export.export(jax.jit(fn), platforms=platforms)(
      _spec(shape, dtype))
  return bytes(exported.serialize())


@FORMATS.register('onnx')
def _onnx(fn, shape, dtype, platforms=None) -> bytes:
  """An ONNX model (jax2onnx, its default opset)."""
  del platforms   # ONNX runtimes pick their own device.
  jax2onnx = _optional('jax2onnx')
  # jax2onnx logs a warning per untyped shape constant; they are harmless.
  py_logging.getLogger('onnx_ir.serde').setLevel(py_logging.ERROR)
  model = jax2onnx.to_onnx(fn, [_spec(shape, dtype)], input_names=['x'],
                           output_names=['y'])
  return model.SerializeToString()


def check_format(name, where: str = 'config.export.formats') -> str:
  """`name` if it is a format in `FORMATS`, else one TCNError naming
  `where` (a config field, an argument or a flag)."""
  if name not in FORMATS:
    raise TCNError(f'unknown export format {name!r} ({where}); choose one '
                   f'of {", ".join(map(repr, FORMATS.names()))}')
  return name


def parse_formats(text: str, where: str = 'config.export.formats'
                  ) -> list[str]:
  """'stablehlo,onnx' -> ['stablehlo', 'onnx'] (each checked; '' -> [])."""
  if not isinstance(text, str):
    raise TCNError(f'{where} must be comma-separated export formats '
                   f'({", ".join(FORMATS.names())}), got {text!r}')
  names = [s.strip() for s in text.split(',') if s.strip()]
  return list(dict.fromkeys(check_format(n, where) for n in names))


def load(path: str) -> Callable[[np.ndarray], np.ndarray]:
  """A written artifact as `x -> outputs` (numpy): jax for '.stablehlo',
  onnxruntime for '.onnx'. Needs none of tcn_jax's model code."""
  if path.endswith(EXTENSIONS['stablehlo']):
    with open(path, 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    return lambda x: np.asarray(exported.call(jnp.asarray(x)))
  if path.endswith(EXTENSIONS['onnx']):
    onnxruntime = _optional('onnxruntime')
    session = onnxruntime.InferenceSession(
        path, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.asarray(x)})[0]
  raise TCNError(f'export.load: {path} is neither a .stablehlo nor an .onnx '
                 'file')
