"""Metrics (accuracy, MSE, parameter counts) and where they are written."""
import time

from absl import logging
import numpy as np

from tcn_jax import engine
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
  """
  x = inputs.batch('evaluate', 'x', x)
  y = inputs.labels('evaluate', 'y', y, len(x), None)
  return accuracy(engine.batched(predict, x, batch_size), y)


class Writer:
  """Scalars to TensorBoard event files (tensorboardX, no TensorFlow needed)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # Imported lazily: optional use.
    self._tb = SummaryWriter(logdir)

  def scalars(self, step: int, values: dict):
    for name, value in values.items():   # TensorBoard-legal tag names.
      tag = name.replace('[', '_').replace(']', '_')
      self._tb.add_scalar(tag, float(value), step)
    self._tb.flush()

  def close(self):
    self._tb.close()


class Progress:
  """Logs one line per epoch with the loss, seconds per epoch and an ETA."""

  def __init__(self, stage: str, total_epochs: int, start_epoch: int):
    self.stage, self.total, self.start = stage, total_epochs, start_epoch
    self.t0 = time.time()
    self.epoch_times = []

  def epoch(self, epoch: int, values: dict):
    self.epoch_times.append(time.time() - self.t0 - sum(self.epoch_times))
    per_epoch = float(np.median(self.epoch_times))
    eta = per_epoch * (self.total - epoch)
    text = ' '.join(f'{k}={v:.4f}' for k, v in values.items())
    logging.info('[%s] epoch %d/%d %s (%.1f s/epoch, ETA %.0f s)',
                 self.stage, epoch, self.total, text, per_epoch, eta)
