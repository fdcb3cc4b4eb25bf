"""The training loop of every stage: the teacher, FF and GAN students, the
head, the KD and KDGAN baselines.

`fit_group` trains a stacked group (`state.MemberState`) for some epochs
with an `engine.Trainer`, resuming from its stage directory, and logs,
validates and writes TensorBoard scalars per epoch; `fit` is it for Flax
models on a loss. Its inputs are a batch source:

  in-memory arrays  each epoch is one chunk, `batch_order(seed, epoch)`
                    gathered on device (`engine.Resident`);
  a `Stream`        the epoch's batches, decoded and augmented by Grain,
                    in chunks of up to MAX_CHUNK_STEPS consecutive batches
                    (`engine.Fed`), the next chunk collected while the last
                    one runs; targets stay on the host, indexed by each
                    chunk's rows (a memory-mapped `.npy` pages in only
                    those), or are computed inside the program from each
                    batch (`OnlineTargets`: online features). With several
                    processes each reads only its own devices' rows.

Both train the same batches with the same per-step keys. Checkpoints: after
every epoch, and with a stream's `checkpoint_every_steps` = K every K steps
into `<stage>/steps/` (chunks end there) with the Grain iterator's state
and the epoch's metrics so far, so a resumed run equals an uninterrupted
one bitwise. Stop signals wait for the chunk in progress and its
checkpoint. Optimizers and schedules are picked by name in `optim`.
"""
import contextlib
import dataclasses
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import numpy as np

from tcn_jax import checkpoint
from tcn_jax import engine
from tcn_jax import input_pipeline
from tcn_jax import inputs
from tcn_jax import mesh as mesh_lib
from tcn_jax import metrics
from tcn_jax import models
from tcn_jax import state as state_lib
from tcn_jax.errors import TCNError

# The stages whose randomness `stage_seed` separates (order fixed: seeds).
STAGES = ('teacher', 'students', 'head', 'kd', 'kdgan')
# A streamed epoch runs as chunks of consecutive batches, each one compiled
# scan over up to this many batches and bytes.
MAX_CHUNK_STEPS = 16
CHUNK_BYTES = 64 << 20


def stage_seed(seed: int, stage: str) -> int:
  """The seed of one stage, derived from the run's seed."""
  return int(np.random.SeedSequence([seed, STAGES.index(stage)])
             .generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class OnlineTargets:
  """Targets computed from each batch inside the step: fn(context, x) ->
  a dict of (members, B, ...) targets, e.g. a frozen teacher's features of
  the (augmented) batch; `context` (the teacher's variables) is an
  argument of the compiled step, not a constant folded into it. view(key,
  x, targets) -> (x, targets), if given, first replaces each batch by a
  random view of it drawn on device from (view_seed, epoch, step)
  (`augment.view`), which the targets and every member then see. A target
  named 'input' (e.g. the frozen students' outputs of the view, for the
  head) is the model's input in place of the batch (`fit`)."""
  fn: Callable[[Any, Any], dict]
  context: Any
  view: Callable[[Any, Any], Any] | None = None
  view_seed: int = 0


def fit(stage_dir, *, name, model, loss, tx, variables, x, targets, ids,
        epochs, batch_size, seed, strategy, val_x, val_targets, val_metric,
        writer, weight_decay=0.0, target_fn=None, evaluate=None):
  """Gradient descent on loss(model(x), target dict) (+ weight_decay * the
  L2 of the kernels) for a stacked group of Flax `variables`; BatchNorm statistics
  and other mutable collections update in train mode. See `fit_group`.
  Returns (variables, history, training seconds)."""
  params = variables['params']
  model_state = {k: v for k, v in variables.items() if k != 'params'}

  def apply_train(p, ms, xb, key):
    return model.apply({'params': p, **ms}, xb, train=True,
                       rngs={'dropout': key}, mutable=list(ms))

  def model_input(xb, tb):   # An online 'input' target (OnlineTargets).
    return tb['input'] if 'input' in tb else xb

  def objective(p, pred, tb):
    out = loss(pred, tb)
    return out + weight_decay * models.l2_penalty(p) if weight_decay else out

  if model_state:
    def loss_fn(p, ms, xb, tb, key):
      pred, ms = apply_train(p, ms, model_input(xb, tb), key)
      return objective(p, pred, tb), ms
  else:
    def loss_fn(p, xb, tb, key):
      return objective(p, apply_train(p, {}, model_input(xb, tb), key)[0],
                       tb)

  state = state_lib.MemberState(params, jax.vmap(tx.init)(params),
                                model_state)
  state, history, seconds = fit_group(
      stage_dir, name=name, member_step=engine.gradient_step(loss_fn, tx),
      state=state, predict=lambda s, xb: model.apply(s.variables(), xb),
      x=x, targets=targets, ids=ids, epochs=epochs, batch_size=batch_size,
      seed=seed, strategy=strategy, val_x=val_x, val_targets=val_targets,
      val_metric=val_metric, writer=writer, target_fn=target_fn,
      evaluate=evaluate)
  return state.variables(), history, seconds


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


class _Arrays:
  """In-memory inputs: each epoch is one chunk (no step checkpoints)."""
  every = 0

  def __init__(self, x, targets, batch_size, seed):
    self.x, self.targets = x, targets
    self.batch_size, self.seed = batch_size, seed
    self.steps = len(x) // batch_size

  def epoch(self, epoch, step0, position):
    del step0, position
    order = input_pipeline.batch_order(self.seed, epoch, len(self.x),
                                       self.batch_size)
    yield 0, engine.Resident(self.x, self.targets, order)

  def position(self):
    return None


def _take(targets, index):
  """The rows `index` (steps, batch) of (members, N, ...) host targets, as
  (steps, members, batch, ...) numpy."""
  def one(t):
    rows = np.take(t, index.reshape(-1), 1)
    return np.swapaxes(rows.reshape((rows.shape[0],) + index.shape
                                    + rows.shape[2:]), 0, 1)
  return jax.tree_util.tree_map(one, targets)


class _Streamed:
  """A `Stream`'s epochs in chunks of consecutive batches, ending at every
  step checkpoint (a multiple of `every`) and at the epoch's end."""

  def __init__(self, x, targets, batch_size, seed, layout):
    self.x, self.targets = x, targets
    self.batch_size, self.seed = batch_size, seed
    self.steps = len(x) // batch_size
    self.every = x.checkpoint_every_steps
    self.k = max(1, min(MAX_CHUNK_STEPS, CHUNK_BYTES // max(
        batch_size * int(np.prod(x.shape[1:])) * 4, 1)))
    self.feed, self.process = {}, None
    if layout.mesh.size > 1 and jax.process_count() > 1:   # Own rows only.
      rows = layout.process_rows(batch_size)
      if rows[0] % (rows[1] - rows[0]) or batch_size % (rows[1] - rows[0]):
        rows = (0, batch_size)   # Not one of equal blocks: read every row.
      size = rows[1] - rows[0]
      self.feed = {'rows': rows, 'batch_size': batch_size}
      self.process = (rows[0] // size, batch_size // size)
    self._batches = None

  def epoch(self, epoch, step0, position):
    self._batches = batches = self.x.batches(
        self.seed, epoch, self.batch_size, train=True, state=position,
        process=self.process)
    step = step0
    try:
      while step < self.steps:
        end = min(step + self.k, self.steps)
        if self.every:
          end = min(end, (step // self.every + 1) * self.every)
        chunk = [next(batches) for _ in range(end - step)]
        index = np.stack([b['index'] for b in chunk])
        yield step, engine.Fed(np.stack([b['image'] for b in chunk]),
                               _take(self.targets, index) if self.targets
                               else {}, **self.feed)
        step = end
    finally:   # Its batches are all taken: workers and buffers go now.
      if hasattr(batches, 'close'):
        batches.close()

  def position(self):
    return self._batches.get_state()


def fit_group(stage_dir, *, name, member_step, state, predict, x, targets, ids,
              epochs, batch_size, seed, strategy, val_x, val_targets,
              val_metric, writer, target_fn=None, evaluate=None):
  """Trains a stacked group for `epochs` with the engine, resuming from
  `stage_dir` (per-epoch checkpoints of the whole state).

  member_step(state, x, target, key) -> (state, metrics dict with 'loss');
  state: a stacked `MemberState`; targets: a dict of (members, N, ...)
  arrays, one member's rows of which are a step's `target` (see
  `tcn_jax.losses`); predict(member_state, x) is scored by
  val_metric(pred, target) per member after each epoch. Without stage_dir
  nothing is saved; without writer nothing goes to TensorBoard. x: arrays
  or a `input_pipeline.Stream`; a target_fn (`OnlineTargets`) adds targets
  computed from each batch (and may view each batch first). evaluate(
  outputs) -> a dict of scalars, with outputs(x) -> (members, B, ...) the
  group's predictions, runs after each epoch (e.g. the assembled TCN's
  accuracy): its values join the epoch's record and progress. On a mesh
  of several devices (`mesh.use`) the state lives there as global arrays
  (what is checkpointed). Returns (state as numpy, history, training
  seconds).
  """
  n = len(ids)
  check_inputs(name, epochs, x, targets)
  trainer = engine.Trainer(
      member_step, n, strategy, target_fn=target_fn and target_fn.fn,
      view=None if target_fn is None or target_fn.view is None else (
          target_fn.view, target_fn.view_seed))
  layout = trainer.layout(batch_size)
  abstract = layout.abstract_state
  with contextlib.ExitStack() as stack:
    ckpt = stage_dir and stack.enter_context(
        checkpoint.StageCheckpoint(stage_dir))
    start = ckpt.latest_epoch() if ckpt else 0
    history, seconds = [], 0.0
    if start:
      state, record = state_lib.restore(ckpt, state, abstract)
      history, seconds = record['history'], record['seconds']
      logging.info('[%s] resuming after epoch %d/%d', name, start, epochs)
    if start >= epochs:
      return mesh_lib.to_host(state), history, seconds
    source = (_Streamed(x, targets, batch_size, seed, layout)
              if isinstance(x, input_pipeline.Stream)
              else _Arrays(x, targets, batch_size, seed))
    if not source.steps:
      raise TCNError(f'batch size {batch_size} is larger than the {len(x)} '
                     'training examples')
    steps_dir = stage_dir and source.every and os.path.join(stage_dir,
                                                            'steps')
    step_ckpt = steps_dir and stack.enter_context(
        checkpoint.StageCheckpoint(steps_dir))
    step0, position, done = 0, None, {}
    if step_ckpt and step_ckpt.latest_epoch():
      rec = step_ckpt.record()
      if rec['epoch'] == start:   # A stop inside epoch `start`.
        state, rec = state_lib.restore(step_ckpt, state, abstract)
        step0, position = rec['step'], rec['iterator']
        done = {k: [np.asarray(v, np.float32) for v in vs]
                for k, vs in rec['metrics'].items()}
        seconds = rec['seconds']
        logging.info('[%s] resuming epoch %d at step %d', name, start + 1,
                     step0)
    context = target_fn.context if target_fn is not None else None
    apply = engine.make_apply_fn(predict, n, strategy, trainer.mesh)
    keys = engine.member_keys(seed, ids)
    progress = metrics.Progress(name, epochs, start, source.steps)
    for epoch in range(start, epochs):
      t0 = time.time()
      collected = {k: list(v) for k, v in done.items()}
      pending = None   # The last chunk's metrics, still being computed.

      def collect(m):
        for k, v in mesh_lib.to_host(m).items():
          collected.setdefault(k, []).extend(v)

      for first, batches in source.epoch(epoch, step0, position):
        with checkpoint.signals_deferred():   # A stop waits for the chunk.
          state, m = trainer(state, batches, keys, epoch, first, context)
          if pending is not None:   # Read while this chunk runs.
            collect(pending)
          pending = m
          end = first + len(batches[0] if isinstance(
              batches, engine.Fed) else batches.order)
          if end == source.steps:   # The epoch's end: record and save.
            collect(pending)
            step_metrics = {k: np.stack(v) for k, v in collected.items()}
            record, losses = metrics.epoch_record(
                name, epoch, ids, step_metrics, apply, state, val_x,
                val_targets, val_metric, seconds, t0, stage_dir, bool(ckpt))
            if evaluate is not None:
              record.update(evaluate(lambda xb, s=state: apply(s, xb)))
            seconds = record['seconds']
            history.append(record)
            if ckpt:
              ckpt.save(epoch + 1, state_lib.to_tree(state),
                        {'history': history, 'seconds': seconds})
          elif step_ckpt and end % source.every == 0:
            collect(pending)
            pending = None
            step_ckpt.save(epoch * source.steps + end,
                           state_lib.to_tree(state), {
                               'epoch': epoch, 'step': end,
                               'iterator': source.position(),
                               'metrics': {k: [v.tolist() for v in vs]
                                           for k, vs in collected.items()},
                               'seconds': seconds + time.time() - t0})
      step0, position, done = 0, None, {}
      metrics.report_epoch(name, ids, record, losses, writer, progress)
    return mesh_lib.to_host(state), history, seconds
