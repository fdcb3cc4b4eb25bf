"""The training loop over a streamed split (`input_pipeline.Stream`).

`fit.fit_group` hands a stage here when its inputs are a `Stream`: instead
of one compiled epoch over arrays on device, one compiled step per batch
that Grain decodes and augments meanwhile. A step is the in-memory epoch's
scan body (same batch order, same per-step keys), so both paths train the
same model. Targets (teacher features, labels) stay on the host, indexed by
the rows of the batch (a memory-mapped `.npy` pages in only those rows), or
are computed inside the step from the batch itself (`target_fn`, e.g. the
frozen teacher's features of the augmented images: online features).

Checkpoints: after every epoch, as the in-memory path, and with the
stream's `checkpoint_every_steps` = K also every K steps into
`<stage>/steps/`, with the Grain iterator's state and the epoch's metrics
so far, so a stop loses at most K steps and the resumed run equals an
uninterrupted one bitwise.
"""
import dataclasses
import mmap
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from tcn_jax import checkpoint
from tcn_jax import engine
from tcn_jax import metrics


@dataclasses.dataclass(frozen=True)
class OnlineTargets:
  """Targets computed from each batch inside the step: fn(context, x) ->
  a dict of (members, B, ...) targets, e.g. a frozen teacher's features of
  the (augmented) batch; `context` (the teacher's variables) is an
  argument of the compiled step, not a constant folded into it."""
  fn: Callable[[Any, Any], dict]
  context: Any


def make_step(member_step, num_members: int, strategy: str, target_fn=None):
  """Jitted `step(state, x, targets, context, keys, epoch, i) -> (state,
  metrics (members,))`: one batch of the in-memory epoch's scan body. With
  an `OnlineTargets` target_fn, its targets are added to `targets` inside
  the step (online features)."""
  strategy = engine.resolve_strategy(strategy)
  if strategy == 'sharded':   # One process's devices: the vmap program.
    strategy = 'vmap'

  def step(state, xb, tb, context, keys, epoch, i):
    if target_fn is not None:
      tb = {**tb, **target_fn.fn(context, xb)}
    epoch_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, epoch + 1)
    kb = jax.vmap(jax.random.fold_in, (0, None))(epoch_keys, i)
    if strategy == 'vmap':
      return jax.vmap(member_step, in_axes=(0, None, 0, 0))(state, xb, tb, kb)
    out = [member_step(s, xb, jax.tree_util.tree_map(lambda t, m=m: t[m], tb),
                       kb[m])
           for m, s in enumerate(engine.unstack(state, num_members))]
    return engine.stack([s for s, _ in out]), engine.stack([m for _, m in out])

  return jax.jit(step, donate_argnums=(0,))


class StackedRows:
  """(members, N, ...) targets stacked from per-member (N, ...) arrays, only
  where a batch reads them: memory-mapped features stay on disk.

  Has what the training loop uses of an array: shape, ndim, dtype and
  `take(index, axis=1)` (what np.take calls)."""

  RELEASE_EVERY = 64   # Batches between dropping read pages (see take).

  def __init__(self, parts):
    self.parts = list(parts)
    first = self.parts[0]
    self.shape = (len(self.parts),) + tuple(first.shape)
    self.ndim, self.dtype = len(self.shape), first.dtype
    self._reads = 0

  def take(self, indices, axis=None, out=None, mode='raise'):
    """The rows `indices` of every part, stacked. Every RELEASE_EVERY calls
    the pages read from memory-mapped parts are dropped from this process
    (madvise DONTNEED; the OS's file cache keeps them), so resident memory
    does not grow with the file over an epoch."""
    del out, mode
    if axis != 1:
      raise ValueError('StackedRows are read by rows (axis 1)')
    rows = np.stack([np.asarray(p[np.asarray(indices)]) for p in self.parts])
    self._reads += 1
    if self._reads % self.RELEASE_EVERY == 0:
      for p in self.parts:
        while p is not None and getattr(p, '_mmap', None) is None:
          p = getattr(p, 'base', None)
        if p is not None and hasattr(mmap, 'MADV_DONTNEED'):
          p._mmap.madvise(mmap.MADV_DONTNEED)  # pylint: disable=protected-access
    return rows


def _take(targets, index):
  """The batch's rows of (members, N, ...) host targets."""
  return jax.tree_util.tree_map(lambda t: jnp.asarray(np.take(t, index, 1)),
                                targets)


def fit_group(stage_dir, *, name, member_step, state, predict, x, targets,
              ids, epochs, batch_size, seed, strategy, val_x, val_targets,
              val_metric, writer, target_fn=None, start=0, history=(),
              seconds=0.0, ckpt=None):
  """`fit.fit_group` on a `Stream` x (called by it, inside its checkpoint
  context `ckpt`, after the epoch-level resume: `start` finished epochs
  with their `history` and `seconds`). Returns (state, history, seconds)."""
  history = list(history)
  n = len(ids)
  every = x.checkpoint_every_steps
  steps_dir = stage_dir and every and os.path.join(stage_dir, 'steps')
  step_ckpt = checkpoint.StageCheckpoint(steps_dir) if steps_dir else None
  try:
    step0, it_state, done = 0, None, {}
    if step_ckpt and step_ckpt.latest_epoch():
      rec = step_ckpt.record()
      if rec['epoch'] == start:   # A stop inside epoch `start`.
        state, rec = step_ckpt.restore(state)
        step0, it_state = rec['step'], rec['iterator']
        done = {k: [np.asarray(v, np.float32) for v in vs]
                for k, vs in rec['metrics'].items()}
        seconds = rec['seconds']
        logging.info('[%s] resuming epoch %d at step %d', name, start + 1,
                     step0)
    step_fn = make_step(member_step, n, strategy, target_fn)
    context = target_fn.context if target_fn is not None else None
    apply = engine.make_apply_fn(predict, n, strategy)
    keys = engine.member_keys(seed, ids)
    steps = len(x) // batch_size
    progress = metrics.Progress(name, epochs, start)
    for epoch in range(start, epochs):
      t0 = time.time()
      batches = x.batches(seed, epoch, batch_size, train=True, state=it_state)
      collected = {k: list(v) for k, v in done.items()}
      step = step0
      for batch in batches:
        tb = _take(targets, batch['index']) if targets else {}
        state, m = step_fn(state, jnp.asarray(batch['image']), tb, context,
                           keys, epoch, step)
        for k, v in m.items():
          collected.setdefault(k, []).append(np.asarray(v))
        step += 1
        if step_ckpt and step % every == 0 and step < steps:
          with checkpoint.signals_deferred():
            step_ckpt.save(epoch * steps + step, state, {
                'epoch': epoch, 'step': step,
                'iterator': batches.get_state(),
                'metrics': {k: [v.tolist() for v in vs]
                            for k, vs in collected.items()},
                'seconds': seconds + time.time() - t0})
      step0, it_state, done = 0, None, {}
      with checkpoint.signals_deferred():   # A stop waits for epoch + save.
        step_metrics = {k: np.stack(v) for k, v in collected.items()}
        record, losses = metrics.epoch_record(
            name, epoch, ids, step_metrics, apply, state, val_x, val_targets,
            val_metric, seconds, t0, stage_dir, bool(ckpt))
        seconds = record['seconds']
        history.append(record)
        if ckpt:
          ckpt.save(epoch + 1, state, {'history': history, 'seconds': seconds})
      metrics.report_epoch(name, ids, record, losses, writer, progress)
    return state, history, seconds
  finally:
    if step_ckpt:
      step_ckpt.close()
