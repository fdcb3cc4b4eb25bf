"""The training loop shared by every stage: a stacked group of models
trained for some epochs by the engine, checkpointed after each epoch.

`fit` trains Flax models on a loss; `fit_group` any per-member step (GAN
students, KDGAN). Both resume from their stage directory and log, validate
and write TensorBoard scalars per epoch. Optimizers are picked by name from
`OPTIMIZERS` (Keras' defaults).
"""
import contextlib
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tcn_jax import checkpoint
from tcn_jax import engine
from tcn_jax import input_pipeline
from tcn_jax import inputs
from tcn_jax import mesh as mesh_lib
from tcn_jax import metrics
from tcn_jax import models
from tcn_jax import streaming
from tcn_jax.errors import TCNError
from tcn_jax.registry import Registry

# The stages whose randomness `stage_seed` separates (order fixed: seeds).
STAGES = ('teacher', 'students', 'head', 'kd', 'kdgan')
OPTIMIZERS = Registry('optimizer', 'optimizer')
OPTIMIZERS.register('adam', lambda lr: optax.adam(lr, eps=1e-7))
OPTIMIZERS.register('nadam', lambda lr: optax.nadam(lr, eps=1e-7))
OPTIMIZERS.register('sgd', lambda lr: optax.sgd(lr, momentum=0.9,
                                                 nesterov=True))


def make_optimizer(name: str, learning_rate, field: str):
  """The optax optimizer `name` (Keras' defaults: Adam/Nadam eps 1e-7, SGD
  with Nesterov momentum 0.9); `field` names the config field in errors,
  e.g. 'config.head.optimizer'."""
  return OPTIMIZERS.get(name, field.removeprefix('config.'))(learning_rate)


def stage_seed(seed: int, stage: str) -> int:
  """The seed of one stage, derived from the run's seed."""
  return int(np.random.SeedSequence([seed, STAGES.index(stage)])
             .generate_state(1)[0])


def fit(stage_dir, *, name, model, loss, tx, variables, x, targets, ids,
        epochs, batch_size, seed, strategy, val_x, val_targets, val_metric,
        writer, weight_decay=0.0, target_fn=None):
  """Gradient descent on loss(model(x), target dict) (+ weight_decay * the
  L2 of the kernels) for a stacked group of Flax `variables`; BatchNorm statistics
  and other mutable collections update in train mode. See `fit_group`.
  Returns (variables, history, training seconds)."""
  params = variables['params']
  model_state = {k: v for k, v in variables.items() if k != 'params'}

  def apply_train(p, ms, xb, key):
    return model.apply({'params': p, **ms}, xb, train=True,
                       rngs={'dropout': key}, mutable=list(ms))

  def objective(p, pred, tb):
    out = loss(pred, tb)
    return out + weight_decay * models.l2_penalty(p) if weight_decay else out

  if model_state:
    def loss_fn(p, ms, xb, tb, key):
      pred, ms = apply_train(p, ms, xb, key)
      return objective(p, pred, tb), ms
  else:
    def loss_fn(p, xb, tb, key):
      return objective(p, apply_train(p, {}, xb, key)[0], tb)

  state = {'params': params, 'opt_state': jax.vmap(tx.init)(params)}
  if model_state:
    state['model_state'] = model_state
  state, history, seconds = fit_group(
      stage_dir, name=name, member_step=engine.gradient_step(loss_fn, tx),
      state=state, predict=lambda s, xb: model.apply(
          {'params': s['params'], **s.get('model_state', {})}, xb), x=x,
      targets=targets, ids=ids, epochs=epochs, batch_size=batch_size,
      seed=seed, strategy=strategy, val_x=val_x, val_targets=val_targets,
      val_metric=val_metric, writer=writer, target_fn=target_fn)
  variables = {'params': state['params'], **state.get('model_state', {})}
  return variables, history, seconds


def check_inputs(name, epochs, x, targets):
  """TCNError, before any work, unless `epochs` is an integer >= 0 and
  every target has one row per input (the Python API's contract; the
  command line checks its config earlier)."""
  inputs.epochs(name, epochs)
  if x is None or targets is None:   # A finished stage, only restored.
    return
  for leaf in jax.tree_util.tree_leaves(targets):
    if np.ndim(leaf) < 2 or np.shape(leaf)[1] != len(x):
      raise TCNError(f'{name}: {len(x)} inputs but targets of shape '
                     f'{np.shape(leaf)} (members, one row per input, ...): '
                     'features and labels need one row per input')


def fit_group(stage_dir, *, name, member_step, state, predict, x, targets, ids,
              epochs, batch_size, seed, strategy, val_x, val_targets,
              val_metric, writer, target_fn=None):
  """Trains a stacked group for `epochs` with the engine, resuming from
  `stage_dir` (per-epoch checkpoints of the whole state).

  member_step(state, x, target, key) -> (state, metrics dict with 'loss');
  targets: a dict of (members, N, ...) arrays, one member's rows of which
  are a step's `target` (see `tcn_jax.losses`); predict(member_state, x) is
  scored by val_metric(pred, target) per member
  after each epoch. Without stage_dir nothing is saved; without writer
  nothing goes to TensorBoard. A `input_pipeline.Stream` x is trained
  batch by batch as it is read (`tcn_jax.streaming`), as is any x with a
  `streaming.OnlineTargets` target_fn, which adds targets computed from
  each batch (in chunks of batches, on the mesh too). On the mesh in use
  (`mesh.use`, several devices) the state lives there as global arrays
  (what is checkpointed) and comes back as numpy.
  Returns (state, history, training seconds).
  """
  n = len(ids)
  check_inputs(name, epochs, x, targets)
  mesh = mesh_lib.active()
  layout = mesh and engine.MeshLayout(mesh, n, batch_size)
  home = mesh_lib.to_host if mesh else lambda s: s
  with (checkpoint.StageCheckpoint(stage_dir) if stage_dir
        else contextlib.nullcontext()) as ckpt:
    start = ckpt.latest_epoch() if ckpt else 0
    history, seconds = [], 0.0
    if start:
      state, record = ckpt.restore(
          layout.abstract_state(state) if mesh else state)
      history, seconds = record['history'], record['seconds']
      logging.info('[%s] resuming after epoch %d/%d', name, start, epochs)
    if start >= epochs:
      return home(state), history, seconds
    if target_fn is not None and not isinstance(x, input_pipeline.Stream):
      x = input_pipeline.Stream(input_pipeline.ArraySource(x))
    if isinstance(x, input_pipeline.Stream):
      return streaming.fit_group(
          stage_dir, name=name, member_step=member_step, state=state,
          predict=predict, x=x, targets=targets, ids=ids, epochs=epochs,
          batch_size=batch_size, seed=seed, strategy=strategy, val_x=val_x,
          val_targets=val_targets, val_metric=val_metric, writer=writer,
          target_fn=target_fn, start=start, history=history,
          seconds=seconds, ckpt=ckpt, mesh=mesh)

    epoch_fn = engine.make_group_epoch(member_step, n, strategy, mesh)
    apply = engine.make_apply_fn(predict, n, strategy, mesh)
    keys = engine.member_keys(seed, ids)
    # On a mesh each epoch's batches are fed from host memory.
    x_dev = np.asarray(x) if mesh else jnp.asarray(x)
    t_dev = jax.tree_util.tree_map(np.asarray if mesh else jnp.asarray,
                                   targets)
    progress = metrics.Progress(name, epochs, start, len(x) // batch_size)
    for epoch in range(start, epochs):
      with checkpoint.signals_deferred():   # A stop waits for epoch + save.
        t0 = time.time()
        order = input_pipeline.batch_order(seed, epoch, len(x), batch_size)
        state, step_metrics = epoch_fn(state, x_dev, t_dev, order, keys, epoch)
        step_metrics = {k: np.asarray(v) for k, v in step_metrics.items()}
        record, losses = metrics.epoch_record(
            name, epoch, ids, step_metrics, apply, state, val_x, val_targets,
            val_metric, seconds, t0, stage_dir, bool(ckpt))
        seconds = record['seconds']
        history.append(record)
        if ckpt:
          ckpt.save(epoch + 1, state, {'history': history, 'seconds': seconds})
      metrics.report_epoch(name, ids, record, losses, writer, progress)
    return home(state), history, seconds
