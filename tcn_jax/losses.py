"""Every loss of the pipeline, and the registry of the students' losses.

Targets are dicts of arrays, one row per example: {'label'} for the teacher
and the head (plus {'mixed_label', 'mix_weight'} on a mixup view of the
head's, `augment.view`), {'logits', 'label'} for Hinton KD, {'logits',
'feature', 'label'} for KDGAN, {'chunk'} for a student (plus {'feature',
'offset'} for a loss that needs the whole teacher feature, e.g. logit
matching).

A student loss is picked by name (`config.students.loss`) from
`STUDENT_LOSSES`: a builder `make(width, **context) -> loss(pred, target)`,
where context holds what a loss may need (the teacher's frozen head, its
variables, the chunking, the config's weight and temperature, and
`settings`: the resolved `config.students` section, where a new loss reads
its own hyperparameters). A new student loss is one function registered
here (and its hyperparameter a field of `config.base_config().students`).
"""
import jax
import jax.numpy as jnp
import optax

from tcn_jax.registry import Registry


def ce(logits, labels):
  """Softmax cross-entropy with integer labels, averaged."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mse(pred, target):
  """Mean squared error over every element (Keras' MSE on a batch)."""
  return jnp.mean((pred - target) ** 2)


def bce(logits, label: float):
  """Binary cross-entropy of logits against a constant label (GAN terms)."""
  return optax.sigmoid_binary_cross_entropy(
      logits, jnp.full_like(logits, label)).mean()


def classification(logits, target):
  """CE to target['label']: the teacher's and the head's loss. On a mixup
  view (`augment.view`) the CE to the two labels mixed, weighted as their
  images: mix_weight * CE(label) + (1 - mix_weight) * CE(mixed_label)."""
  if 'mixed_label' not in target:
    return ce(logits, target['label'])
  per = optax.softmax_cross_entropy_with_integer_labels
  w = target['mix_weight']
  return (w * per(logits, target['label'])
          + (1 - w) * per(logits, target['mixed_label'])).mean()


def kd(temperature: float, alpha: float):
  """Hinton et al. (2015): alpha * T^2 * CE(softmax(t/T), softmax(s/T)) +
  (1 - alpha) * CE(s, label), on targets {'logits', 'label'}."""
  def loss(logits, target):
    soft = optax.softmax_cross_entropy(
        logits / temperature,
        jax.nn.softmax(target['logits'] / temperature)).mean()
    return (alpha * temperature ** 2 * soft
            + (1 - alpha) * ce(logits, target['label']))
  return loss


STUDENT_LOSSES = Registry('student loss', 'students.loss')


@STUDENT_LOSSES.register('mse')
def student_mse(width, **unused):
  """The paper's FF loss: MSE to the student's chunk."""
  del width, unused
  return lambda pred, target: mse(pred, target['chunk'])


student_mse.needs_feature = False


@STUDENT_LOSSES.register('logit_matching')
def logit_matching(width, *, head, head_variables, weight, temperature,
                   chunker, **unused):
  """Not in the paper: a classification-aware student loss that keeps
  students independent. MSE to the chunk + weight * T^2 * KL(softmax(teacher
  logits / T) || softmax(head(teacher feature with this chunk replaced by
  the student's output) / T)), the frozen teacher head in inference mode.

  Targets carry the whole (encoded) teacher feature and the chunk's offset;
  `chunker.decode` maps an encoded feature back (PCA chunks).
  """
  del width, unused

  def logits(feature):
    return head.apply(head_variables, chunker.decode(feature)) / temperature

  def loss(pred, target):
    feature, offset = target['feature'], target['offset'][0]
    mixed = jax.lax.dynamic_update_slice_in_dim(feature, pred, offset, axis=1)
    t = jax.nn.log_softmax(logits(feature))
    s = jax.nn.log_softmax(logits(mixed))
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1).mean()
    return mse(pred, target['chunk']) + weight * temperature ** 2 * kl
  return loss


logit_matching.needs_feature = True
