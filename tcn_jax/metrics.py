"""Metrics (accuracy, MSE, parameter counts) and where they are written:
TensorBoard, and progress (a live bar in notebooks, log lines elsewhere)."""
import logging as std_logging
import re
import sys
import time

from absl import logging
import numpy as np

from tcn_jax.errors import TCNError
from tcn_jax import input_pipeline
from tcn_jax import inputs


def accuracy(logits, labels) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels))


def mse(pred, target) -> float:
  """Keras-style MSE: mean over feature dims, then over examples."""
  return float(np.mean((np.asarray(pred) - np.asarray(target)) ** 2))


def evaluate(predict, x, y, batch_size: int = 1000) -> float:
  """Test accuracy of a jitted `predict(images) -> logits`, batched.

  Args:
    predict: images -> logits (e.g. `make_predict(tcn)`).
    x, y: inputs (the API's contract: `tcn_jax.inputs`) and integer labels.
    batch_size: examples per call.

  Returns:
    The fraction of `x` classified as `y`, in [0, 1].
  """
  x = inputs.batch('evaluate', 'x', x)
  y = inputs.labels('evaluate', 'y', y, len(x), None)
  classes = _num_outputs(predict, x)   # Labels in range, before any work.
  if classes:
    inputs.labels('evaluate', 'y', y, len(x), classes)
  logits = input_pipeline.batched(predict, x, batch_size)
  if not classes and np.ndim(logits) == 2:
    inputs.labels('evaluate', 'y', y, len(x), np.shape(logits)[-1])
  return accuracy(logits, y)


def _num_outputs(predict, x) -> int:
  """The width of `predict`'s logits for `x`'s examples, traced (no work);
  0 when `predict` cannot be traced (a function outside JAX)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    out = jax.eval_shape(predict, jax.ShapeDtypeStruct((1, *x.shape[1:]),
                                                       x.dtype))
  except TCNError:
    raise
  except Exception:  # pylint: disable=broad-except  (then checked after)
    return 0
  return int(out.shape[-1]) if len(getattr(out, 'shape', ())) == 2 else 0


class Writer:
  """Scalars to TensorBoard event files (tensorboardX, no TensorFlow needed)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # Imported lazily: optional use.
    self._tb = SummaryWriter(logdir)

  def scalars(self, step: int, values: dict):
    for name, value in values.items():   # TensorBoard-legal tag names.
      tag = re.sub(r'[^-/\w.]', '_', name)
      self._tb.add_scalar(tag, float(value), step)
    self._tb.flush()

  def close(self):
    self._tb.close()


# How training reports progress (`set_progress`): 'auto' = a live bar in a
# notebook (tqdm.auto), log lines elsewhere; 'bar' = a bar anywhere; 'log' =
# one log line per epoch; 'none' = silent.
PROGRESS_MODES = ('auto', 'bar', 'log', 'none')
_progress_mode = 'auto'
# The validation metric of each stage's last epoch record, by name
# ('accuracy', 'mse'): progress labels it (val_acc, val_mse).
_VAL_LABELS = {'accuracy': 'val_acc', 'mse': 'val_mse'}
_val_label = {}


def emit(text: str):
  """A progress line, visible wherever training runs: absl INFO where absl
  shows it (the command line), else stderr (a plain script, whose absl
  level hides INFO)."""
  if _progress_mode == 'none':
    return
  if logging.get_absl_logger().isEnabledFor(std_logging.INFO):
    logging.info('%s', text)
  else:
    print(text, file=sys.stderr, flush=True)


def stage_start(stage: str, what: str):
  """One line as a stage (or a long step of one) begins."""
  emit(f'[{stage}] {what}')


def epoch_record(name, epoch, ids, step_metrics, apply, state, val_x,
                 val_targets, val_metric, seconds, t0, stage_dir, saved):
  """One training epoch's record for a stacked group of len(ids) members.

  Its per-step metrics (steps, members) must be finite, else one TCNError
  naming the member, the step and the last checkpoint (`saved`: epochs go to
  `stage_dir`). Then `apply(state, x)` is scored on the validation set with
  `val_metric` per member.

  Returns:
    (record, per-step losses); record['seconds'] adds the time since t0.
  """
  losses = step_metrics['loss']
  bad = np.argwhere(~np.all([np.isfinite(v) for v in step_metrics.values()],
                            axis=0))
  if len(bad):
    step, member = bad[0]
    raise TCNError(
        f'non-finite loss in stage {name}, member {ids[member]}, epoch '
        f'{epoch + 1}, step {step}; last good checkpoint: '
        + (f'epoch {epoch} in {stage_dir}' if epoch and saved else 'none'))
  preds = input_pipeline.batched(lambda xb: apply(state, xb), val_x, axis=1)
  val = [val_metric(preds[m], val_targets[m]) for m in range(len(ids))]
  metric = getattr(val_metric, '__name__', 'val')
  _val_label[name] = _VAL_LABELS.get(metric, f'val_{metric}')
  record = {'epoch': epoch + 1, 'train_loss': losses.mean(0).tolist(),
            'val': val, 'seconds': seconds + time.time() - t0}
  record.update({f'train_{k}': v.mean(0).tolist()
                 for k, v in step_metrics.items() if k != 'loss'})
  return record, losses


def report_epoch(name, ids, record, losses, writer, progress):
  """An epoch's record to TensorBoard (per member) and to the progress."""
  scores = {k: v for k, v in record.items() if k.startswith('tcn_')}
  if writer:
    writer.scalars(record['epoch'], {
        **{f'{name}/{k}/{i}': v for k, vs in record.items()
           if k.startswith('train_') or k == 'val' for i, v in zip(ids, vs)},
        **{f'students/{k}': v for k, v in scores.items()}})
  progress.epoch(record['epoch'],
                 {'loss': float(losses[-len(losses) // 10 - 1:].mean()),
                  _val_label.get(name, 'val'): float(np.mean(record['val'])),
                  **scores})


def set_progress(mode: str) -> str:
  """Sets how every training function reports progress, for the process.

  Args:
    mode: 'auto' (a live `tqdm.auto` bar in a Jupyter / Colab notebook, log
      lines elsewhere), 'bar' (a bar anywhere, also on a terminal), 'log'
      (one absl log line per epoch: loss, seconds per epoch, ETA) or 'none'.

  Returns:
    The mode that was set before, so a caller can restore it.
  """
  global _progress_mode
  if mode not in PROGRESS_MODES:
    raise TCNError(f'unknown progress mode {mode!r}; choose one of '
                   f'{PROGRESS_MODES}')
  before, _progress_mode = _progress_mode, mode
  return before


def in_notebook() -> bool:
  """Whether this process is a Jupyter (or Colab) kernel."""
  ipython = sys.modules.get('IPython')
  try:
    shell = ipython and ipython.get_ipython()
    return bool(shell) and 'IPKernelApp' in shell.config
  except Exception:  # pylint: disable=broad-except
    return False


class Progress:
  """One stage's progress, per epoch: a live bar of steps with the loss, the
  validation score and an ETA, or one log line (see `set_progress`)."""

  def __init__(self, stage: str, total_epochs: int, start_epoch: int,
               steps_per_epoch: int = 1):
    self.stage, self.total, self.start = stage, total_epochs, start_epoch
    self.steps = steps_per_epoch
    self.t0 = time.time()
    self.epoch_times = []
    mode = _progress_mode
    if mode == 'auto':
      mode = 'bar' if in_notebook() else 'log'
    self.mode, self.bar = mode, None
    if mode == 'log':
      if start_epoch >= total_epochs:
        emit(f'[{stage}] all {total_epochs} epochs saved: reused')
      else:
        emit(f'[{stage}] training epochs {start_epoch + 1}..{total_epochs}'
             + (f' ({steps_per_epoch} steps each)' if steps_per_epoch > 1
                else '') + ('; the first includes compilation'
                            if start_epoch < total_epochs else ''))
    if mode == 'bar' and start_epoch < total_epochs:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total_epochs * self.steps,
                      initial=start_epoch * self.steps, desc=stage,
                      unit='step', dynamic_ncols=True)

  def epoch(self, epoch: int, values: dict):
    self.epoch_times.append(time.time() - self.t0 - sum(self.epoch_times))
    if self.bar is not None:
      self.bar.set_postfix(epoch=f'{epoch}/{self.total}', refresh=False,
                           **{k: f'{v:.4f}' for k, v in values.items()})
      self.bar.update(self.steps)
      if epoch >= self.total:
        self.bar.close()
    if self.mode != 'log':
      return
    text = ' '.join(f'{k}={v:.4f}' for k, v in values.items())
    left = self.total - epoch
    if len(self.epoch_times) == 1:   # Compilation included: no rate yet.
      timing = f'{self.epoch_times[0]:.1f} s with compilation'
      if left:
        timing += ', ETA after the next epoch'
    else:   # The first epoch (compilation) left out of the rate.
      per_epoch = float(np.median(self.epoch_times[1:]))
      timing = f'{per_epoch:.1f} s/epoch, ETA {per_epoch * left:.0f} s'
    emit(f'[{self.stage}] epoch {epoch}/{self.total} {text} ({timing})')
