"""The training loop over a streamed split (`input_pipeline.Stream`).

`fit.fit_group` hands a stage here when its inputs are a `Stream`: instead
of one compiled epoch over arrays on device, the epoch's batches, decoded
and augmented by Grain, are collected into chunks of up to MAX_CHUNK_STEPS
consecutive batches (K, B, ...) and each chunk runs through one compiled
scan, the in-memory epoch's body with a step offset (`engine.make_chunk_fn`):
same batch order, same per-step keys, so both paths train the same model.
A chunk is dispatched asynchronously; the previous chunk's metrics are read
and the next chunk collected while it runs. On a mesh of several devices
chunks are fed through `engine.MeshLayout`: batches over 'data', members
over 'students'; with several processes each reads (decodes) and feeds only
its own devices' rows of every batch (`MeshLayout.process_rows`). Targets
(teacher features, labels) stay on the host, indexed by the rows of the
chunk (a memory-mapped `.npy` pages in only those rows), or are computed
inside the program from each batch (`target_fn`, e.g. the frozen teacher's
features of the augmented images: online features).

Checkpoints: after every epoch, as the in-memory path, and with the
stream's `checkpoint_every_steps` = K also every K steps into
`<stage>/steps/` (chunks end there), with the Grain iterator's state and
the epoch's metrics so far, so a stop loses at most K steps and the
resumed run equals an uninterrupted one bitwise.
"""
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
from tcn_jax import mesh as mesh_lib
from tcn_jax import metrics


@dataclasses.dataclass(frozen=True)
class OnlineTargets:
  """Targets computed from each batch inside the step: fn(context, x) ->
  a dict of (members, B, ...) targets, e.g. a frozen teacher's features of
  the (augmented) batch; `context` (the teacher's variables) is an
  argument of the compiled step, not a constant folded into it."""
  fn: Callable[[Any, Any], dict]
  context: Any


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
        input_pipeline.drop_pages(p)
    return rows


# A streamed epoch runs as chunks of consecutive batches, each one compiled
# scan (the in-memory epoch's body) over up to this many batches and bytes.
MAX_CHUNK_STEPS = 16
CHUNK_BYTES = 64 << 20


def _take(targets, index):
  """The rows `index` (steps, batch) of (members, N, ...) host targets, as
  (steps, members, batch, ...) numpy."""
  def one(t):
    rows = np.take(t, index.reshape(-1), 1)
    return np.swapaxes(rows.reshape((rows.shape[0],) + index.shape
                                    + rows.shape[2:]), 0, 1)
  return jax.tree_util.tree_map(one, targets)


def chunk_steps(batch_bytes: int) -> int:
  """Batches per chunk: up to MAX_CHUNK_STEPS and CHUNK_BYTES of inputs."""
  return max(1, min(MAX_CHUNK_STEPS, CHUNK_BYTES // max(batch_bytes, 1)))


def _chunks(batches, step, steps, k, every):
  """(first step, [batches]) of up to k consecutive batches, ending at
  every step checkpoint (a multiple of `every`) and at the epoch's end."""
  while step < steps:
    end = min(step + k, steps)
    if every:
      end = min(end, (step // every + 1) * every)
    chunk = []
    for _ in range(end - step):
      chunk.append(next(batches))
    yield step, chunk
    step = end


def fit_group(stage_dir, *, name, member_step, state, predict, x, targets,
              ids, epochs, batch_size, seed, strategy, val_x, val_targets,
              val_metric, writer, target_fn=None, start=0, history=(),
              seconds=0.0, ckpt=None, mesh=None):
  """`fit.fit_group` on a `Stream` x (called by it, inside its checkpoint
  context `ckpt`, after the epoch-level resume: `start` finished epochs
  with their `history` and `seconds`; `mesh`: the active mesh of several
  devices, or None). Returns (state, history, seconds)."""
  history = list(history)
  n = len(ids)
  every = x.checkpoint_every_steps
  steps_dir = stage_dir and every and os.path.join(stage_dir, 'steps')
  step_ckpt = checkpoint.StageCheckpoint(steps_dir) if steps_dir else None
  layout = mesh and engine.MeshLayout(mesh, n, batch_size)
  try:
    step0, it_state, done = 0, None, {}
    if step_ckpt and step_ckpt.latest_epoch():
      rec = step_ckpt.record()
      if rec['epoch'] == start:   # A stop inside epoch `start`.
        state, rec = step_ckpt.restore(
            layout.abstract_state(state) if mesh else state)
        step0, it_state = rec['step'], rec['iterator']
        done = {k: [np.asarray(v, np.float32) for v in vs]
                for k, vs in rec['metrics'].items()}
        seconds = rec['seconds']
        logging.info('[%s] resuming epoch %d at step %d', name, start + 1,
                     step0)
    chunk_fn = engine.make_chunk_fn(
        member_step, n, strategy, mesh,
        target_fn.fn if target_fn is not None else None)
    context = target_fn.context if target_fn is not None else None
    apply = engine.make_apply_fn(predict, n, strategy, mesh)
    keys = engine.member_keys(seed, ids)
    steps = len(x) // batch_size
    feed, process = {}, None
    if mesh and jax.process_count() > 1:   # Read only this process's rows.
      rows = layout.process_rows(batch_size)
      if rows[0] % (rows[1] - rows[0]) or batch_size % (rows[1] - rows[0]):
        rows = (0, batch_size)   # Not one of equal blocks: read every row.
      size = rows[1] - rows[0]
      feed = {'rows': rows, 'batch_size': batch_size}
      process = (rows[0] // size, batch_size // size)
    k = chunk_steps(batch_size * int(np.prod(x.shape[1:])) * 4)
    progress = metrics.Progress(name, epochs, start)
    for epoch in range(start, epochs):
      t0 = time.time()
      batches = x.batches(seed, epoch, batch_size, train=True, state=it_state,
                          process=process)
      collected = {key: list(v) for key, v in done.items()}
      pending = None   # The last chunk's metrics, still being computed.

      def collect(m):
        for key, v in m.items():
          collected.setdefault(key, []).extend(mesh_lib.to_host(v))

      for first, chunk in _chunks(batches, step0, steps, k, every):
        xs = np.stack([b['image'] for b in chunk])
        index = np.stack([b['index'] for b in chunk])
        ts = _take(targets, index) if targets else {}
        state, m = chunk_fn(state, xs, ts, keys, epoch, first, context,
                            **feed)
        if pending is not None:   # Read while this chunk runs.
          collect(pending)
        pending = m
        end = first + len(chunk)
        if step_ckpt and end % every == 0 and end < steps:
          collect(pending)
          pending = None
          with checkpoint.signals_deferred():
            step_ckpt.save(epoch * steps + end, state, {
                'epoch': epoch, 'step': end,
                'iterator': batches.get_state(),
                'metrics': {key: [v.tolist() for v in vs]
                            for key, vs in collected.items()},
                'seconds': seconds + time.time() - t0})
      if pending is not None:
        collect(pending)
      step0, it_state, done = 0, None, {}
      with checkpoint.signals_deferred():   # A stop waits for epoch + save.
        step_metrics = {key: np.stack(v) for key, v in collected.items()}
        record, losses = metrics.epoch_record(
            name, epoch, ids, step_metrics, apply, state, val_x, val_targets,
            val_metric, seconds, t0, stage_dir, bool(ckpt))
        seconds = record['seconds']
        history.append(record)
        if ckpt:
          ckpt.save(epoch + 1, state, {'history': history, 'seconds': seconds})
      metrics.report_epoch(name, ids, record, losses, writer, progress)
    return (mesh_lib.to_host(state) if mesh else state), history, seconds
  finally:
    if step_ckpt:
      step_ckpt.close()
