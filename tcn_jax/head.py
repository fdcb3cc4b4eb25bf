"""Stage 3: the assembled TCN's head, fine-tuned on the frozen students.

The head starts as the teacher's output layer and is trained with cross-
entropy on the students' concatenated outputs (inference mode, so they are
computed once); the paper reports test accuracy before and after (Table 2).
"""
import dataclasses
import os


from tcn_jax import assemble
from tcn_jax import checkpoint
from tcn_jax import engine
from tcn_jax import fit
from tcn_jax import inputs
from tcn_jax import layers
from tcn_jax import losses
from tcn_jax import mesh as mesh_lib
from tcn_jax import metrics
from tcn_jax import record
from tcn_jax import workdir as workdir_lib


def finetune_head(tcn, ds, *, epochs, batch_size=128, optimizer='adam',
                  learning_rate=1e-3, seed=0, strategy='auto',
                  eval_batch_size=1000, workdir=None, writer=None):
  """Trains `tcn`'s head with CE on the frozen students' outputs.

  Args:
    tcn: an `assemble.TCN` (students trained, head initialised).
    ds: a `data.Dataset`.
    epochs, batch_size, optimizer, learning_rate: the config's `head`.
    seed: the run's seed.
    strategy: the engine strategy for running the students.
    eval_batch_size: examples per call when computing the students' outputs.
    workdir: checkpoints go to `workdir/head` (None: nothing saved).
    writer: optional TensorBoard writer.

  Returns:
    (tcn with the new head, info) with info = {'test_acc_before',
    'test_acc_after', 'history', 'seconds'}.
  """
  inputs.epochs('finetune_head', epochs)
  stage_dir = workdir and os.path.join(workdir, 'head')
  # A finished head (resume) needs only the test outputs.
  splits = ('train', 'val', 'test')
  if checkpoint.finished_epochs(stage_dir) >= epochs:
    splits = ('test',)
  ds = inputs.dataset('finetune_head', ds, spec=tcn.groups[0].spec,
                      num_classes=tcn.num_classes, shape=tcn.input_shape,
                      splits=splits)
  outputs = assemble.student_outputs_fn(tcn, strategy)
  students = [g.variables for g in tcn.groups]
  if tcn.input_shape is None:   # A TCN saved before students recorded it.
    inputs.fits('finetune_head', f'ds.{splits[0]}.x',
                getattr(ds, splits[0]).x, lambda xb: outputs(students, xb))
  # On the mesh in use (several devices) the forward passes are
  # data-parallel; on one device the plain jitted programs.
  student_outputs = mesh_lib.forward(outputs, students,
                                     lambda xb: outputs(students, xb))
  feats = {s: engine.batched(student_outputs, getattr(ds, s).x,
                             eval_batch_size)
           for s in splits}
  head = assemble.tcn_head(tcn)
  logits = lambda v, f: engine.batched(
      mesh_lib.forward(head.apply, v), f, eval_batch_size)
  test_acc = lambda v: metrics.accuracy(logits(v, feats['test']), ds.test.y)
  before = test_acc(tcn.head_variables)
  seed = fit.stage_seed(seed, 'head')
  variables, history, seconds = fit.fit(
      stage_dir, name='head', model=head, loss=losses.classification,
      tx=fit.make_optimizer(optimizer, learning_rate, 'config.head.optimizer'),
      variables=engine.stack([tcn.head_variables]), x=feats.get('train'),
      targets={'label': ds.train.y[None]}, ids=[0], epochs=epochs,
      batch_size=batch_size, seed=seed, strategy='auto',
      val_x=feats.get('val'), val_targets=ds.val.y[None],
      val_metric=metrics.accuracy, writer=writer)
  tcn = dataclasses.replace(tcn,
                            head_variables=engine.unstack(variables, 1)[0])
  after = test_acc(tcn.head_variables)
  return tcn, {'test_acc_before': before, 'test_acc_after': after,
               'history': history, 'seconds': seconds}


def key(run: record.Run, students_key: str) -> str:
  """The head stage's key."""
  c = run.config
  return workdir_lib.stage_key(
      stage='head', students=students_key, head=c.head.to_dict(),
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
      workdir=run.workdir or None, writer=run.writer)
  return record.Head(tcn, info, key)
