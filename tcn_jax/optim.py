"""Optimizers and learning-rate schedules, by name (light: optax only, so
the config checks names without importing the training loop).

`OPTIMIZERS` (Keras' defaults) is picked by `<section>.optimizer`;
`LR_SCHEDULES` by the stages: the teacher's 'step' (`teacher.lr_step_epochs`
> 0), the students' `students.lr_schedule` ('constant' or 'cosine') and the
head's 'constant'. A schedule is built by `schedule(name, ...)` from the
stage's learning rate and step counts; 'constant' is the learning rate
itself (a float), so optimizers built from it are the same as without a
schedule.
"""
import optax

from tcn_jax.registry import Registry

OPTIMIZERS = Registry('optimizer', 'optimizer')
OPTIMIZERS.register('adam', lambda lr: optax.adam(lr, eps=1e-7))
OPTIMIZERS.register('nadam', lambda lr: optax.nadam(lr, eps=1e-7))
OPTIMIZERS.register('sgd', lambda lr: optax.sgd(lr, momentum=0.9,
                                                 nesterov=True))
LR_SCHEDULES = Registry('learning-rate schedule', 'students.lr_schedule')


def make_optimizer(name: str, learning_rate, field: str):
  """The optax optimizer `name` (Keras' defaults: Adam/Nadam eps 1e-7, SGD
  with Nesterov momentum 0.9) over `learning_rate` (a float or a schedule);
  `field` names the config field in errors, e.g. 'config.head.optimizer'."""
  return OPTIMIZERS.get(name, field.removeprefix('config.'))(learning_rate)


@LR_SCHEDULES.register('constant')
def _constant(learning_rate, steps_per_epoch, epochs, step_epochs,
              step_factor):
  """The paper: the learning rate itself."""
  del steps_per_epoch, epochs, step_epochs, step_factor
  return learning_rate


@LR_SCHEDULES.register('cosine')
def _cosine(learning_rate, steps_per_epoch, epochs, step_epochs, step_factor):
  """Cosine decay to 0 over the epochs (not in the paper)."""
  del step_epochs, step_factor
  return optax.cosine_decay_schedule(learning_rate,
                                     max(1, epochs * steps_per_epoch))


@LR_SCHEDULES.register('step')
def _step(learning_rate, steps_per_epoch, epochs, step_epochs, step_factor):
  """Times `step_factor` every `step_epochs` epochs (the teacher's
  `lr_step_epochs` / `lr_step_factor`)."""
  del epochs
  return optax.exponential_decay(learning_rate, step_epochs * steps_per_epoch,
                                 step_factor, staircase=True)


def schedule(name: str, learning_rate: float, *, steps_per_epoch: int,
             epochs: int = 0, step_epochs: int = 0, step_factor: float = 1.0,
             field: str | None = None):
  """The learning rate (a float or an optax schedule) of schedule `name`
  for a stage of `epochs` epochs of `steps_per_epoch` steps; TCNError naming
  `field` (default `students.lr_schedule`) for an unknown name."""
  return LR_SCHEDULES.get(name, field)(learning_rate, steps_per_epoch, epochs,
                                       step_epochs, step_factor)
