"""Stage 1: the teacher, trained with cross-entropy or loaded trained.

`teacher.init_from` names a workdir of this library (its `teacher/`), a
teacher checkpoint directory, or a Keras model file (`.keras`, `.h5`; see
`keras_convert`, with `teacher.keras_mode=body`): that teacher is used as
it is (the paper's "huge pre-trained network"), checked against
`teacher.body` by shape. An ONNX file (`init_from=*.onnx`), a Keras file
taken whole (the default for a whole-model file) or precomputed features
(`features_from`) take `given_teacher`'s stage instead.
"""
import json
import os

import jax

from tcn_jax import checkpoint
from tcn_jax import engine
from tcn_jax import fit
from tcn_jax import given_teacher
from tcn_jax import inputs
from tcn_jax import keras_convert
from tcn_jax import layers
from tcn_jax import losses
from tcn_jax import mesh as mesh_lib
from tcn_jax import metrics
from tcn_jax import models
from tcn_jax import optim
from tcn_jax import record
from tcn_jax import state as state_lib
from tcn_jax import workdir as workdir_lib
from tcn_jax.errors import TCNError


def train_teacher(teacher, ds, *, epochs, batch_size=256, optimizer='adam',
                  learning_rate=1e-3, weight_decay=0.0, lr_step_epochs=0,
                  lr_step_factor=0.5, seed=0, workdir=None, writer=None):
  """Trains the teacher with cross-entropy (resumable in `workdir`).

  Args:
    teacher: a `models.Teacher`.
    ds: a `data.Dataset` (train, val used).
    epochs, batch_size, optimizer, learning_rate, weight_decay: as in the
      config's `teacher` section; with lr_step_epochs > 0 the learning rate
      is multiplied by lr_step_factor every lr_step_epochs epochs.
    seed: the run's seed.
    workdir: checkpoints go to `workdir/teacher` (None: nothing saved).
    writer: optional TensorBoard writer.

  Returns:
    (variables, info): Flax variables {'params', ['batch_stats']};
    info = {'history', 'seconds'}.
  """
  inputs.epochs('train_teacher', epochs)
  ds = inputs.dataset('train_teacher', ds, spec=teacher.body,
                      num_classes=teacher.num_classes, splits=('train', 'val'))
  seed = fit.stage_seed(seed, 'teacher')
  lr = optim.schedule('step' if lr_step_epochs else 'constant', learning_rate,
                      steps_per_epoch=len(ds.train) // batch_size,
                      step_epochs=lr_step_epochs, step_factor=lr_step_factor)
  variables, history, seconds = fit.fit(
      workdir and os.path.join(workdir, 'teacher'), name='teacher',
      model=teacher, loss=losses.classification,
      tx=optim.make_optimizer(optimizer, lr, 'config.teacher.optimizer'),
      variables=engine.init_group(lambda k: teacher.init(k, ds.train.x[:1]),
                                  seed, [0]),
      x=ds.train.x, targets={'label': ds.train.y[None]}, ids=[0],
      epochs=epochs, batch_size=batch_size, seed=seed, strategy='auto',
      val_x=ds.val.x, val_targets=ds.val.y[None], val_metric=metrics.accuracy,
      writer=writer, weight_decay=weight_decay)
  return (engine.unstack(variables, 1)[0],
          {'history': history, 'seconds': seconds})


def check_source(path: str, workdir: str):
  """Fails with one line, before anything is read or written, unless
  `config.teacher.init_from` names a usable source: a non-empty Keras file,
  or a finished teacher (every epoch its own config.json asks for) outside
  the workdir it feeds (recomputing that workdir's stages would delete it).
  """
  what = f'config.teacher.init_from {path!r}'
  if not os.path.exists(path):
    raise TCNError(f'{what}: no such file or directory')
  if keras_convert.is_keras_file(path):
    if os.path.isfile(path) and os.path.getsize(path) == 0:
      raise TCNError(f'{what}: the file is empty (0 bytes), corrupt or not '
                     'fully written; save the model again')
    return
  source, target = os.path.realpath(path), os.path.realpath(workdir)
  if source == target or source.startswith(target + os.sep):
    raise TCNError(f'{what} is inside the workdir {workdir} it would feed '
                   '(a changed config there deletes it); copy the teacher '
                   'out, or give another workdir')
  # The run that trained it: `path` is its workdir, or that one's teacher/.
  run = path if os.path.isdir(os.path.join(path, 'teacher')) else (
      os.path.dirname(source) if os.path.basename(source) == 'teacher'
      else '')
  config_path = os.path.join(run, 'config.json') if run else ''
  if not config_path or not os.path.isfile(config_path):
    return   # A bare checkpoint directory: its shapes are checked on load.
  try:
    with open(config_path) as f:
      wanted = json.load(f)['teacher']['epochs']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise TCNError(f'{what}: its run record {config_path} cannot be read '
                   f'({type(e).__name__})') from None
  where = os.path.join(run, 'teacher')
  done = checkpoint.finished_epochs(where) if os.path.isdir(where) else 0
  if isinstance(wanted, int) and 0 < done < wanted:
    raise TCNError(f'{what} holds an unfinished teacher ({done} of its '
                   f'{wanted} epochs, {config_path}); finish that run first '
                   'or give a finished one')


def load_teacher(path: str, teacher, x_example):
  """The trained variables of `teacher` from `path`.

  Args:
    path: a workdir of this library (its teacher/ stage), a teacher
      checkpoint directory, or a Keras file (`.keras` or whole-model `.h5`
      mapped onto `teacher.body` layer by layer; `.weights.h5` of
      keras.applications.ResNet50), see
      `keras_convert.teacher_variables_from_keras`.
    teacher: the `models.Teacher` the variables are for.
    x_example: example inputs (N, ...) of the data.

  Returns:
    Flax variables {'params', ['batch_stats']}.

  Raises:
    TCNError naming `config.teacher.init_from` when `path` holds no teacher,
    or one of another architecture (the first differing layer).
  """
  if keras_convert.is_keras_file(path):
    return keras_convert.teacher_variables_from_keras(
        path, teacher, x_example, what='config.teacher.init_from')
  where = os.path.join(path, 'teacher')
  if not os.path.isdir(where):
    where = path
  if checkpoint.finished_epochs(where) == 0:
    raise TCNError(f'config.teacher.init_from {path!r} holds no teacher '
                   'checkpoint (a workdir of this library or its teacher/ '
                   'directory)')
  template = jax.eval_shape(lambda: teacher.init(jax.random.key(0),
                                                 x_example))
  with checkpoint.StageCheckpoint(where, read_only=True) as ckpt:
    state, _ = ckpt.restore()   # A MemberState's tree (state.to_tree).
  variables = engine.unstack(state_lib.from_tree(state).variables(), 1)[0]
  got = checkpoint.shapes(variables)
  want = checkpoint.shapes(template)
  if got != want:
    key = min(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    raise TCNError(f'config.teacher.init_from {path!r} holds a teacher of '
                   f'another architecture ({key}: stored '
                   f'{got.get(key, "nothing")}, config.teacher.body needs '
                   f'{want.get(key, "nothing")})')
  return variables


def key(run: record.Run, loaded_digest: str = '') -> str:
  """The teacher stage's key."""
  c = run.config
  # Fields of given teachers (ONNX, features) only when used: earlier runs'
  # keys stay the same.
  section = given_teacher.key_fields(c.teacher.to_dict())
  if loaded_digest:   # A loaded teacher: its parameters, not its schedule.
    section = {k: section[k] for k in ('body', 'head_dropout', 'head_bn')}
  return workdir_lib.stage_key(
      stage='teacher', teacher=section, loaded=loaded_digest,
      layers_impl=c.layers_impl, seed=c.seed, data=run.data_key,
      num_classes=run.ds.num_classes, **workdir_lib.dtype_key(c))


def model(run: record.Run) -> models.Teacher:
  c = run.config
  return models.Teacher(c.teacher.body, run.ds.num_classes,
                        c.teacher.head_dropout, c.layers_impl,
                        c.teacher.head_bn, models.compute_dtype(c))


def run_stage(run: record.Run, key: str, loaded=None) -> record.Teacher:
  """The pipeline's teacher stage: `loaded` variables (init_from), or
  trained and checkpointed in the workdir; tested on the test split."""
  c, ds, teacher = run.config.teacher, run.ds, model(run)
  seconds = 0.0
  variables = loaded
  if variables is None:
    variables, info = train_teacher(
        teacher, ds, epochs=c.epochs, batch_size=c.batch_size,
        optimizer=c.optimizer, learning_rate=c.learning_rate,
        weight_decay=c.weight_decay, lr_step_epochs=c.lr_step_epochs,
        lr_step_factor=c.lr_step_factor, seed=run.config.seed,
        workdir=run.workdir or None, writer=run.writer)
    seconds = info['seconds']
  evaluated = teacher.clone(impl=layers.stage_impl(run.config.layers_impl,
                                                   run.config.forward_impl))
  predict = mesh_lib.forward(evaluated.apply, variables)
  if loaded is not None and keras_convert.is_keras_file(c.init_from):
    given_teacher.check_chance(run.config, metrics.evaluate(
        predict, ds.val.x, ds.val.y, run.config.eval_batch_size),
                               ds.num_classes)   # Class order mismatch?
  acc = metrics.evaluate(predict, ds.test.x, ds.test.y,
                         run.config.eval_batch_size)
  return record.Teacher(teacher, variables, acc, seconds, key)
