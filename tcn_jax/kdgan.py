"""KDGAN baseline (Wang et al., NeurIPS 2018), adapted to a pretrained teacher.

KDGAN trains a classifier C with distillation from a teacher T plus an
adversarial game: a discriminator D tells true (input, label) pairs from
pairs whose label C sampled. What this module builds, and how it differs:

  * C: one classifier student (architecture string + Dense(classes)), the
    same network as the Hinton-KD baseline of the matching n.
  * Distillation: the Hinton KD loss on T's logits (T and alpha), as in KD.
  * D: an MLP on [teacher feature of x, label distribution]. KDGAN's D sees
    the raw input; here the frozen teacher's dense feature stands in for x
    (a learned summary of it, already computed), so D stays small.
  * C's labels are straight-through Gumbel-softmax samples (one-hot forward,
    relaxed gradient), KDGAN's low-variance alternative to REINFORCE.
  * T is pretrained and frozen: KDGAN also trains T adversarially and with
    distillation from C; that third player is not built.

Per batch, simultaneous updates: a C step on KD loss + adv_weight *
BCE(D(feature, C's sample), real) against the current D, and a D step on the
same samples (true labels real, C's samples fake).
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tcn_jax.losses import bce
from tcn_jax.state import MemberState


class LabelDiscriminator(nn.Module):
  """MLP on [feature, label distribution] -> real/fake logit."""
  hidden: Sequence[int] = (256, 128)

  @nn.compact
  def __call__(self, feature, labels):
    x = jnp.concatenate([feature, labels], axis=-1)
    for width in self.hidden:
      x = nn.leaky_relu(nn.Dense(width)(x), 0.2)
    return nn.Dense(1)(x)[..., 0]


def gumbel_softmax_st(key, logits, temperature: float):
  """Straight-through Gumbel-softmax: one-hot samples, relaxed gradients."""
  soft = jax.nn.softmax((logits + jax.random.gumbel(key, logits.shape))
                        / temperature)
  hard = jax.nn.one_hot(jnp.argmax(soft, -1), logits.shape[-1])
  return soft + jax.lax.stop_gradient(hard - soft)


def init_state(classifier, disc, c_tx, d_tx, key, x_example, feature_dim,
               num_classes):
  """One member's state: the classifier's params, optimizer state and model
  state; extras: the discriminator's params 'd' and optimizer state
  'd_opt'."""
  k_c, k_d = jax.random.split(key)
  c_vars = classifier.init(k_c, x_example)
  c = c_vars['params']
  d = disc.init(k_d, jnp.zeros((1, feature_dim)),
                jnp.zeros((1, num_classes)))['params']
  return MemberState(c, c_tx.init(c), {k: v for k, v in c_vars.items()
                                       if k != 'params'},
                     {'d': d, 'd_opt': d_tx.init(d)})


def make_member_step(classifier, disc, c_tx, d_tx, kd_loss, num_classes, *,
                     adv_weight=1.0, gumbel_temperature=1.0):
  """member_step(state, x, target, key) -> (state, metrics) for the engine.

  target: {'logits': the teacher's, 'feature': its dense feature, 'label'};
  kd_loss(logits, target) is the distillation loss (`losses.kd`).
  """

  def classify(c, c_state, x, key):
    logits, upd = classifier.apply(
        {'params': c, **c_state}, x, train=True, rngs={'dropout': key},
        mutable=list(c_state))
    return logits, upd

  def d_loss(d, feature, real, fake):
    return (bce(disc.apply({'params': d}, feature, real), 1.0)
            + bce(disc.apply({'params': d}, feature, fake), 0.0))

  def c_loss(c, state, x, target, key):
    feature = target['feature']
    k_drop, k_gumbel = jax.random.split(key)
    logits, c_state = classify(c, state.model_state, x, k_drop)
    sample = gumbel_softmax_st(k_gumbel, logits, gumbel_temperature)
    adv = bce(disc.apply({'params': state.extras['d']}, feature, sample), 1.0)
    kd = kd_loss(logits, target)
    return kd + adv_weight * adv, (c_state, kd, sample)

  def member_step(state, x, target, key):
    (loss, (c_state, kd, sample)), grads = jax.value_and_grad(
        c_loss, has_aux=True)(state.params, state, x, target, key)
    updates, c_opt = c_tx.update(grads, state.opt_state, state.params)
    real = jax.nn.one_hot(target['label'], num_classes)
    d = state.extras['d']
    dl, d_grads = jax.value_and_grad(d_loss)(
        d, target['feature'], real, jax.lax.stop_gradient(sample))
    d_updates, d_opt = d_tx.update(d_grads, state.extras['d_opt'], d)
    return state.replace(
        params=optax.apply_updates(state.params, updates),
        model_state=c_state, opt_state=c_opt,
        extras={'d': optax.apply_updates(d, d_updates), 'd_opt': d_opt}), {
            'loss': loss, 'kd_loss': kd, 'd_loss': dl}

  return member_step
