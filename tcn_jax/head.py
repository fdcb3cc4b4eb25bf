"""Stage 3: the assembled TCN's head, fine-tuned on the frozen students.

The head starts as the teacher's output layer and is trained with cross-
entropy on the students' concatenated outputs (inference mode, so they are
computed once); the paper reports test accuracy before and after (Table 2).
With views (`config.head.views`, e.g. the students' own) the head trains
on the students' outputs of a random view of each batch instead, computed
in the step, with mixup's labels mixed as its images.
"""
import contextlib
import dataclasses
import functools
import glob
import hashlib
import os
import tempfile

from absl import logging
import jax
import numpy as np

from tcn_jax import assemble
from tcn_jax import augment
from tcn_jax import checkpoint
from tcn_jax import engine
from tcn_jax import features as features_lib
from tcn_jax import fit
from tcn_jax import input_pipeline
from tcn_jax import inputs
from tcn_jax import layers
from tcn_jax import losses
from tcn_jax import mesh as mesh_lib
from tcn_jax import metrics
from tcn_jax import optim
from tcn_jax import record
from tcn_jax import workdir as workdir_lib


def finetune_head(tcn, ds, *, epochs, batch_size=128, optimizer='adam',
                  learning_rate=1e-3, seed=0, strategy='auto',
                  eval_batch_size=1000, workdir=None, writer=None, views=''):
  """Trains `tcn`'s head with CE on the frozen students' outputs.

  On the mesh in use (`mesh.use`, several devices) the students' outputs
  and the head's test logits are computed data-parallel. A streamed train
  split (`input_pipeline.Stream`) is never held whole: its outputs go to
  `workdir/head/outputs.train.<digest>.npy` (a temporary directory without
  a workdir), reused while its inputs are the same, and the head trains
  from that memory map batch by batch.

  Args:
    tcn: an `assemble.TCN` (students trained, head initialised).
    ds: a `data.Dataset`.
    epochs, batch_size, optimizer, learning_rate: the config's `head`.
    seed: the run's seed.
    strategy: the engine strategy for running the students.
    eval_batch_size: examples per call when computing the students' outputs.
    workdir: checkpoints go to `workdir/head` (None: nothing saved).
    writer: optional TensorBoard writer.
    views: an augmentation's name (`augment.view`, drawn on device): the
      head trains on the students' outputs of each batch's random view,
      computed in the step (validation and test: the images as they are).

  Returns:
    (tcn with the new head, info) with info = {'test_acc_before',
    'test_acc_after', 'val_acc_before', 'val_acc_after', 'history',
    'seconds'}.
  """
  inputs.epochs('finetune_head', epochs)
  aug = views and augment.check_view(views, 'config.head.views')
  stage_dir = workdir and os.path.join(workdir, 'head')
  # A finished head (resume) needs only the val and test outputs.
  splits = ('train', 'val', 'test')
  if checkpoint.finished_epochs(stage_dir) >= epochs:
    splits = ('val', 'test')
  ds = inputs.dataset('finetune_head', ds, spec=tcn.groups[0].spec,
                      num_classes=tcn.num_classes, shape=tcn.input_shape,
                      splits=splits)
  streamed = 'train' in splits and isinstance(ds.train.x,
                                              input_pipeline.Stream)
  online = 'train' in splits and bool(aug)   # Outputs of views, in the step.
  outputs = assemble.student_outputs_fn(tcn, strategy)
  students = [g.variables for g in tcn.groups]
  if tcn.input_shape is None:   # A TCN saved before students recorded it.
    inputs.fits('finetune_head', f'ds.{splits[0]}.x',
                getattr(ds, splits[0]).x, lambda xb: outputs(students, xb))
  # On the mesh in use (several devices) the forward passes are
  # data-parallel; on one device the plain jitted programs.
  student_outputs = mesh_lib.forward(outputs, students,
                                     lambda xb: outputs(students, xb))
  feats = {s: input_pipeline.batched(student_outputs, getattr(ds, s).x,
                             eval_batch_size)
           for s in splits if s != 'train' or not (streamed or online)}
  target_fn = None
  if online:   # The head's input: the students' outputs of each view.
    feats['train'] = ds.train.x
    target_fn = fit.OnlineTargets(
        lambda ctx, xb: {'input': outputs(ctx, xb)[None]}, students,
        view=functools.partial(augment.view, aug),
        view_seed=augment.view_seed(fit.stage_seed(seed, 'head')))
  with contextlib.ExitStack() as stack:
    if streamed and not online:   # N x D outputs on disk, as a Stream.
      out_dir = stage_dir or stack.enter_context(tempfile.TemporaryDirectory())
      feats['train'] = train_outputs(
          out_dir, student_outputs, ds.train.x, eval_batch_size,
          digest=checkpoint.digest(students, tcn.basis, ds.train.x) + repr((
              [g.describe() for g in tcn.groups], tcn.impl, strategy,
              eval_batch_size)))
    tcn, info = _train(tcn, ds, feats, stage_dir, epochs=epochs,
                       batch_size=batch_size, optimizer=optimizer,
                       learning_rate=learning_rate, seed=seed,
                       eval_batch_size=eval_batch_size, writer=writer,
                       target_fn=target_fn)
  return tcn, info


def train_outputs(directory, outputs, x, batch_size, digest):
  """The students' outputs of the streamed split `x` as a `Stream` over
  `directory/outputs.train.<digest>.npy` (a memory map, written batch by
  batch and renamed: whole or absent), reused when the file of the same
  digest (students, basis, split, batching) is there; older ones removed."""
  name = 'outputs.train.' + hashlib.sha256(digest.encode()).hexdigest()[:16]
  path = os.path.join(directory, name + '.npy')
  os.makedirs(directory, exist_ok=True)
  if jax.process_index() == 0:
    for old in glob.glob(os.path.join(directory, 'outputs.train.*.npy')):
      if os.path.basename(old) != name + '.npy':
        os.remove(old)
  try:
    if np.load(path, mmap_mode='r').shape[0] != len(x):
      raise ValueError(path)
    logging.info('head: reusing %s', path)
  except (OSError, ValueError):   # Missing or damaged: compute again.
    features_lib.write_rows(path, outputs, x, batch_size)
  return input_pipeline.Stream(
      input_pipeline.NpySource(path), _Rows(),
      checkpoint_every_steps=x.checkpoint_every_steps)


class _Rows(input_pipeline.Transform):
  """Rows of an (N, D) array read as they are (not images)."""

  def eval(self, record):
    return self._finish(record, np.asarray(record['image']))


def _train(tcn, ds, feats, stage_dir, *, epochs, batch_size, optimizer,
           learning_rate, seed, eval_batch_size, writer, target_fn):
  """Tests, fine-tunes and tests the head on the students' outputs
  (feats['train'], or those target_fn computes of each training batch)."""
  head = assemble.tcn_head(tcn)
  logits = lambda v, f: input_pipeline.batched(
      mesh_lib.forward(head.apply, v), f, eval_batch_size)
  acc = lambda v, split: metrics.accuracy(logits(v, feats[split]),
                                         getattr(ds, split).y)
  before = {s: acc(tcn.head_variables, s) for s in ('val', 'test')}
  seed = fit.stage_seed(seed, 'head')
  variables, history, seconds = fit.fit(
      stage_dir, name='head', model=head, loss=losses.classification,
      tx=optim.make_optimizer(
          optimizer, optim.schedule('constant', learning_rate,
                                    steps_per_epoch=0),
          'config.head.optimizer'),
      variables=engine.stack([tcn.head_variables]), x=feats.get('train'),
      targets={'label': ds.train.y[None]}, ids=[0], epochs=epochs,
      batch_size=batch_size, seed=seed, strategy='auto',
      val_x=feats.get('val'), val_targets=ds.val.y[None],
      val_metric=metrics.accuracy, writer=writer, target_fn=target_fn)
  tcn = dataclasses.replace(tcn,
                            head_variables=engine.unstack(variables, 1)[0])
  after = {s: acc(tcn.head_variables, s) for s in ('val', 'test')}
  return tcn, {'test_acc_before': before['test'],
               'test_acc_after': after['test'],
               'val_acc_before': before['val'], 'val_acc_after': after['val'],
               'history': history, 'seconds': seconds}


def key(run: record.Run, students_key: str) -> str:
  """The head stage's key."""
  c = run.config
  return workdir_lib.stage_key(
      stage='head', students=students_key,
      head=workdir_lib.section_key(c.head.to_dict(), added=('views',)),
      head_bn=c.teacher.head_bn, eval_batch_size=c.eval_batch_size,
      seed=c.seed, data=run.data_key, **workdir_lib.forward_key(c))


def run_stage(run: record.Run, teacher: record.Teacher,
              students: record.Students, key: str) -> record.Head:
  """The pipeline's head stage: assembles the TCN from the students and the
  teacher's head, fine-tunes the head."""
  c, h = run.config, run.config.head
  head_bn = c.teacher.head_bn and h.keep_teacher_bn
  tcn = assemble.TCN(students.groups, run.ds.num_classes, float(h.dropout),
                     assemble.teacher_head(teacher.variables, head_bn),
                     layers.stage_impl(c.layers_impl, c.forward_impl),
                     students.chunker.basis, head_bn)
  tcn, info = finetune_head(
      tcn, run.ds, epochs=h.epochs, batch_size=h.batch_size,
      optimizer=h.optimizer, learning_rate=h.learning_rate, seed=c.seed,
      strategy=c.students.strategy, eval_batch_size=c.eval_batch_size,
      workdir=run.workdir or None, writer=run.writer, views=h.views)
  return record.Head(tcn, info, key)
