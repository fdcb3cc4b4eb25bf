"""Export of the assembled TCN, and of each student on its own, out of Python.

Two formats (`FORMATS`), each one file holding the weights and the program:

  stablehlo  a serialized `jax.export.Exported` (StableHLO inside). Any jax
             runs it, without tcn_jax's model code:
               f = jax.export.deserialize(open(path, 'rb').read())
               logits = f.call(images)
  onnx       an ONNX model (`jax2onnx`), for `onnxruntime` and other runtimes.

The batch size is polymorphic unless one is given. A student's artifact maps
images to that student's output (its chunk of the feature, or of the PCA
coefficients), so students can be served on separate devices as the paper
proposes; the TCN's maps images to logits, like `assemble.make_predict`.

  python -m tcn_jax.export_cli --workdir runs/fmnist --formats stablehlo,onnx

exports a trained workdir's `tcn/` into `<workdir>/export/` (`export_workdir`);
`--config.export.formats=...` makes a run do the same at its end.
"""
import dataclasses
import json
import os
from typing import Callable, Sequence

import jax
import numpy as np

from tcn_jax import assemble
from tcn_jax import checkpoint
from tcn_jax import config as config_lib
from tcn_jax import engine
from tcn_jax import input_pipeline
from tcn_jax import layers
from tcn_jax.errors import TCNError
from tcn_jax.formats import check_format
from tcn_jax.formats import EXTENSIONS
from tcn_jax.formats import FORMATS
from tcn_jax.formats import load   # pylint: disable=unused-import

def forward(net: assemble.TCN, student: int | None = None,
            impl: str | None = None) -> Callable:
  """`images -> outputs` with the weights as constants: the TCN's logits, or
  student `student`'s output (in chunk order: student i owns chunk i).

  Args:
    net: an assembled TCN.
    student: None for the whole TCN, else a student's index in [0, n).
    impl: the convolution path (`layers.IMPLS`); None: as `make_predict`
      (`layers.forward_impl`).
  """
  if impl is not None and impl not in layers.IMPLS:
    raise TCNError(f'export: impl must be one of {layers.IMPLS}, got '
                   f'{impl!r}')
  net = dataclasses.replace(net, impl=impl or layers.forward_impl(net.impl))
  if student is None:
    return assemble.make_predict(net, 'unrolled')
  for g in net.groups:
    if type(student) is int and student in g.member_ids:  # pylint: disable=unidiomatic-typecheck
      model = g.model(net.impl)
      m = g.member_ids.index(student)
      variables = engine.unstack(g.variables, len(g.member_ids))[m]
      return jax.jit(lambda x: model.apply(variables, x))
  raise TCNError(f'export: no student {student!r} in a TCN of '
                 f'{net.num_students} students (0 to {net.num_students - 1})')


def export(net: assemble.TCN, path: str, format: str = 'stablehlo', *,  # pylint: disable=redefined-builtin
           input_shape: Sequence[int], batch_size: int | None = None,
           student: int | None = None, input_dtype=np.float32,
           impl: str | None = None,
           platforms: Sequence[str] | None = None) -> str:
  """Writes the TCN (or one student) as one `format` file at `path`.

  Args:
    net: an assembled TCN (`tcn.TCN`, `tcn.load_tcn(...)[1]`).
    path: the file to write (its directory must exist; a file there is
      replaced, atomically).
    format: a name in `FORMATS` ('stablehlo' or 'onnx').
    input_shape: one input's shape, e.g. (28, 28, 1).
    batch_size: a fixed batch size, or None for any batch size.
    student: None for the whole TCN, else one student's index.
    input_dtype: the inputs' dtype (int32 for token ids).
    impl: the convolution path in the artifact; None: as `make_predict`.
    platforms: stablehlo only: jax platforms to lower for ('cpu', 'cuda',
      'tpu'); None: this process's backend.

  Returns:
    `path`.
  """
  write = FORMATS.get(check_format(format, 'export: format'))
  if batch_size is not None and (not isinstance(batch_size, int) or
                                 isinstance(batch_size, bool) or
                                 batch_size < 1):
    raise TCNError(f'export: batch_size must be a positive integer or None, '
                   f'got {batch_size!r}')
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise TCNError(f'export: {path} is a directory; give a file path')
  if not os.path.isdir(directory):
    raise TCNError(f'export: the directory of {path} does not exist')
  shape = (batch_size, *(int(d) for d in input_shape))
  fn = forward(net, student, impl)
  try:
    data = write(fn, shape, np.dtype(input_dtype), platforms)
  except TCNError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (converters' own)
    raise TCNError(f'export: {format} export of '
                   f'{"the TCN" if student is None else f"student {student}"}'
                   f' failed: {type(e).__name__}: '
                   f'{(str(e).strip().splitlines() or [""])[0]}') from e
  checkpoint.atomic_write(path, lambda f: f.write(data))
  return path


def export_all(net: assemble.TCN, directory: str, formats: Sequence[str], *,
               input_shape: Sequence[int], batch_size: int | None = None,
               input_dtype=np.float32, impl: str | None = None) -> list[str]:
  """Writes `tcn.<ext>` and `student<i>.<ext>` for every format into
  `directory` (created); returns the paths written."""
  for name in formats:
    check_format(name, 'export_all: formats')
  os.makedirs(directory, exist_ok=True)
  paths = []
  for name in formats:
    for student in (None, *range(net.num_students)):
      stem = 'tcn' if student is None else f'student{student}'
      paths.append(export(
          net, os.path.join(directory, stem + EXTENSIONS[name]), name,
          input_shape=input_shape, batch_size=batch_size, student=student,
          input_dtype=input_dtype, impl=impl))
  return paths


def export_workdir(workdir: str, formats: Sequence[str],
                   batch_size: int | None = None,
                   input_shape: Sequence[int] | None = None) -> list[str]:
  """Exports a trained workdir's `tcn/` into `<workdir>/export/`; the input
  shape (unless given) from the data named in its config.json."""
  tcn_dir = os.path.join(workdir, 'tcn')
  if not os.path.isdir(tcn_dir):
    raise TCNError(f'export: {workdir} holds no trained TCN ({tcn_dir} is '
                   'missing; run the pipeline to its end first)')
  _, net = assemble.load_tcn(tcn_dir)
  dtype = np.float32
  config_path = os.path.join(workdir, 'config.json')
  try:
    with open(config_path) as f:
      data_config = config_lib.upgrade(json.load(f))['data']
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    raise TCNError(f'export: {config_path} cannot be read') from None
  if input_shape is None or data_config['name'] == 'imdb':
    ds = input_pipeline.load(config_lib.data_config(**data_config))
    input_shape = input_shape or ds.test.x.shape[1:]
    dtype = ds.test.x.dtype
  return export_all(net, os.path.join(workdir, 'export'), formats,
                    input_shape=input_shape, batch_size=batch_size,
                    input_dtype=dtype)
