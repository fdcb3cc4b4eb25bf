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

from tcn_jax import checkpoint
from tcn_jax import data as data_lib
from tcn_jax import engine
from tcn_jax import mesh as mesh_lib
from tcn_jax import record
from tcn_jax import workdir as workdir_lib


def teacher_features(teacher, variables, x,
                     batch_size: int = 1000) -> np.ndarray:
  """(N, D) features of the teacher's feature layer, inference mode, batched.

  Args:
    teacher: a `models.Teacher` (anything with a `features` method).
    variables: its Flax variables ({'params', ['batch_stats']}).
    x: (N, ...) inputs.
    batch_size: examples per compiled call.

  On the mesh in use (`mesh.use`, several devices) each batch is split over
  its devices (data-parallel).
  """
  mesh = mesh_lib.active()
  if mesh:
    apply = mesh_lib.data_parallel(
        lambda v, xb: teacher.apply(v, xb, method=teacher.features), mesh)
    return engine.batched(lambda xb: apply(variables, xb), np.asarray(x),
                          batch_size)
  fn = jax.jit(lambda xb: teacher.apply(variables, xb,
                                        method=teacher.features))
  return engine.batched(fn, np.asarray(x), batch_size)


def key(run: record.Run, teacher_key: str) -> str:
  """The features stage's key."""
  c = run.config
  return workdir_lib.stage_key(
      stage='features', teacher=teacher_key, augment=c.students.augment,
      eval_batch_size=c.eval_batch_size, data=run.data_key)


def run_stage(run: record.Run, teacher: record.Teacher,
              key: str) -> record.Features:
  """Features of train / val (and with students.augment='flip' of the
  mirrored train images), read from `features.npz` when its key matches."""
  ds, c = run.ds, run.config
  images = {'train': ds.train.x, 'val': ds.val.x}
  if c.students.augment == 'flip':
    images['train_flip'] = data_lib.hflip(ds.train.x)
  path = run.workdir and os.path.join(run.workdir, 'features.npz')
  feats = None
  try:
    if path:
      with np.load(path) as f:
        if str(f['digest']) == key:
          logging.info('features: reusing %s', path)
          feats = {s: f[s] for s in images}
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
    pass   # Missing, from another version, or damaged: compute again.
  if feats is None:
    feats = {s: teacher_features(teacher.model, teacher.variables, x,
                                 c.eval_batch_size)
             for s, x in images.items()}
    if path and jax.process_index() == 0:   # One writer per run.
      checkpoint.atomic_write(path, lambda f: np.savez(f, digest=key,
                                                       **feats))
  return record.Features(feats['train'], feats['val'],
                         feats.get('train_flip'), key)
