"""The teacher's dense features (paper Sec. 3): computed once, cached.

The features are the layer before the teacher's logits, in inference mode.
The pipeline keeps them in `workdir/features.npz` with the stage's key, so a
rerun with the same teacher and data reads them back and any other teacher
or data computes them again. How they are split between the students is
`tcn_jax.chunking`.
"""
import os
import zipfile

from absl import logging
import jax
import numpy as np

from tcn_jax import augment
from tcn_jax import checkpoint
from tcn_jax import given_teacher
from tcn_jax import input_pipeline
from tcn_jax import inputs
from tcn_jax import layers
from tcn_jax import models
from tcn_jax import mesh as mesh_lib
from tcn_jax import record
from tcn_jax import workdir as workdir_lib
from tcn_jax.errors import TCNError


def teacher_features(teacher, variables, x,
                     batch_size: int = 1000) -> np.ndarray:
  """(N, D) features of the teacher's feature layer, inference mode, batched.

  On the mesh in use (`mesh.use`, several devices) each batch is split over
  its devices (data-parallel).

  Args:
    teacher: a `models.Teacher`, or a `FunctionTeacher` (`teacher_from_flax`,
      `teacher_from_keras`): anything whose `apply` takes
      `method=teacher.features`.
    variables: its variables ({'params', ['batch_stats']} for a Teacher).
    x: (N, ...) inputs (the API's contract: `tcn_jax.inputs`), or a
      `input_pipeline.Stream`.
    batch_size: examples per compiled call.

  Returns:
    (N, D) float32 numpy features.
  """
  host = getattr(teacher, 'host_features', None)
  if host is not None:   # Run outside XLA (an ONNX teacher), on the host.
    return input_pipeline.batched(
        host, x if hasattr(x, 'in_order') else np.asarray(x), batch_size)
  fn = jax.jit(lambda xb: teacher.apply(variables, xb,
                                        method=teacher.features))
  if isinstance(x, input_pipeline.Stream):   # Read (and checked) in batches.
    return input_pipeline.batched(fn, x, batch_size)
  x = inputs.batch('teacher_features', 'x', x,
                   spec=getattr(teacher, 'body', None))
  inputs.fits('teacher_features', 'x', x, fn)
  mesh = mesh_lib.active()
  if mesh:
    apply = mesh_lib.data_parallel(
        lambda v, xb: teacher.apply(v, xb, method=teacher.features), mesh)
    fn = lambda xb: apply(variables, xb)  # pylint: disable=unnecessary-lambda-assignment
  return input_pipeline.batched(fn, np.asarray(x), batch_size)


def choose_mode(run: record.Run) -> tuple[str, str]:
  """('cached' or 'online', why) for `config.students.features`: 'auto'
  is cached when the train features fit in data.memory_limit_mb and the
  training images are not augmented, else online (KDGAN needs them
  cached)."""
  c, x = run.config, run.ds.train.x
  mode = c.students.features or 'cached'
  if mode != 'auto':
    return mode, 'config.students.features'
  if given_teacher.kind(c) and c.students.views:
    raise TCNError(f'config.students.views={c.students.views!r} needs the '
                   'teacher run online, on each view; a given teacher '
                   f'({given_teacher.kind(c)}) is not: set students.views=""')
  if given_teacher.kind(c):   # Runs on the host, outside the students' step.
    return 'cached', 'a given teacher (ONNX, precomputed) is not run online'
  dim = models.output_shape(c.teacher.body, x.shape[1:], c.layers_impl,
                            x.dtype)[-1]
  aug = augment.get(c.data.augment)
  mb = len(x) * dim * 4 * (2 if aug.mirrored_copies else 1) / 2**20
  limit = c.data.memory_limit_mb
  if c.kdgan.enabled:
    return 'cached', 'KDGAN needs cached features'
  if isinstance(x, input_pipeline.Stream) and x.transform.augments:
    return 'online', 'the training images are augmented every epoch'
  if c.students.views:
    return 'online', (f'the students see views {c.students.views!r} '
                      '(config.students.views)')
  if mb > limit:
    return 'online', (f'they would take {mb:.0f} MB, over '
                      f'data.memory_limit_mb={limit}')
  return 'cached', (f'they take {mb:.1f} MB (data.memory_limit_mb={limit}) '
                    'and no augmentation is used')


def key(run: record.Run, teacher_key: str) -> str:
  """The features stage's key."""
  c = run.config
  online = choose_mode(run)[0] == 'online'
  return workdir_lib.stage_key(
      stage='features', teacher=teacher_key,
      augment=augment.key_name(c.data.augment),
      eval_batch_size=c.eval_batch_size, data=run.data_key,
      **workdir_lib.forward_key(c), **({'mode': 'online'} if online else {}))


def write_features(path: str, teacher, variables, x, batch_size: int):
  """Features of a streamed split into the `.npy` file `path` (written
  batch by batch into a memory map, then renamed: never held whole);
  returns it opened as a read-only memory map."""
  fn = getattr(teacher, 'host_features', None) or jax.jit(
      lambda xb: teacher.apply(variables, xb, method=teacher.features))
  return write_rows(path, fn, x, batch_size)


def write_rows(path: str, fn, x, batch_size: int):
  """fn(batch) of every batch of the streamed split `x`, in order, into the
  `.npy` file `path` (a memory map written batch by batch, then renamed,
  so `path` is whole or absent); returns it as a read-only memory map."""
  tmp = path + f'.tmp{jax.process_index()}.npy'
  out, pos = None, 0
  for batch in x.in_order(batch_size):
    xb = batch['image']
    n = len(xb)
    if n < batch_size:
      xb = np.concatenate([xb, np.repeat(xb[-1:], batch_size - n, 0)])
    f = np.asarray(fn(xb))[:n]
    if out is None:
      out = np.lib.format.open_memmap(tmp, 'w+', f.dtype,
                                      (len(x),) + f.shape[1:])
    out[pos:pos + n] = f
    pos += n
  out.flush()
  del out
  os.replace(tmp, path)
  return np.load(path, mmap_mode='r')


def run_stage(run: record.Run, teacher: record.Teacher,
              key: str) -> record.Features:
  """Features of train / val (and with data.augment='mirror' of the
  mirrored train images), read from `features.npz` when its key matches.

  Online (`choose_mode`): only val's; the students compute train's. A
  streamed train split's features go to `features.train.npy`, a memory
  map, beside `features.npz`.
  """
  ds, c = run.ds, run.config
  mode, why = choose_mode(run)
  logging.info('features: %s (%s)', mode, why)
  streamed = isinstance(ds.train.x, input_pipeline.Stream)
  images = {'val': ds.val.x}
  if mode == 'cached':
    images['train'] = ds.train.x
    if augment.get(c.data.augment).mirrored_copies:
      images['train_flip'] = augment.hflip(ds.train.x)
  path = run.workdir and os.path.join(run.workdir, 'features.npz')
  npy = path and os.path.join(run.workdir, 'features.train.npy')
  feats = None
  try:
    if path:
      with np.load(path) as f:
        if str(f['digest']) == key:
          feats = {s: f[s] for s in images if s != 'train' or not streamed}
          if 'train' in images and streamed:
            feats['train'] = np.load(npy, mmap_mode='r')
            if feats['train'].shape[0] != len(ds.train):
              raise ValueError(npy)
          logging.info('features: reusing %s', path)
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
    feats = None   # Missing, from another version, or damaged: compute again.
  if feats is None:
    model = teacher.model
    if hasattr(model, 'clone'):   # Not a FunctionTeacher (e.g. ONNX).
      model = model.clone(impl=layers.stage_impl(c.layers_impl,
                                                 c.forward_impl))
    feats = {}
    for s, x in images.items():
      if s == 'train' and streamed and path:
        feats[s] = write_features(npy, model, teacher.variables, x,
                                  c.eval_batch_size)
      else:
        feats[s] = teacher_features(model, teacher.variables, x,
                                    c.eval_batch_size)
    if path and jax.process_index() == 0:   # One writer per run.
      small = {s: f for s, f in feats.items() if s != 'train' or not streamed}
      checkpoint.atomic_write(path, lambda f: np.savez(f, digest=key,
                                                       **small))
  return record.Features(feats.get('train'), feats['val'],
                         feats.get('train_flip'), key, mode)
