"""GAN students (paper Sec. 3, "GAN" columns of Table 3).

Each student (generator) has its own discriminator that sees only a feature
chunk: real (the teacher's chunk) or fake (the student's output). As in the
authors' code, the discriminator has two heads: a real/fake logit and a
reconstruction of the chunk. Per batch: one discriminator step on the real
chunk, one on the fake (each with its own BatchNorm batch statistics), then
`g_steps_per_d_step` student steps against the frozen discriminator
(BatchNorm in inference mode). The student's MSE term is selectable:

  'student_output'       MSE(student(x), chunk), what the paper says;
  'disc_reconstruction'  MSE(D_recon(student(x)), chunk), what the authors'
                         notebooks do (the student is never compared to the
                         chunk directly).
"""
from typing import Sequence

import flax.linen as nn
import jax
import optax

from tcn_jax.errors import TCNError
from tcn_jax.state import MemberState
from tcn_jax.losses import bce
from tcn_jax.losses import mse

MSE_TARGETS = ('student_output', 'disc_reconstruction')


class Discriminator(nn.Module):
  """Unconditional MLP on a chunk: Dense -> LeakyReLU, then [Dense -> BN ->
  LeakyReLU] blocks; heads: real/fake logit and chunk reconstruction."""
  hidden: Sequence[int]
  out_dim: int
  first_bias: bool = False
  recon_relu: bool = False

  @nn.compact
  def __call__(self, chunk, train: bool = False):
    x = nn.Dense(self.hidden[0], use_bias=self.first_bias)(chunk)
    x = nn.leaky_relu(x, 0.2)
    for width in self.hidden[1:]:
      x = nn.Dense(width)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.99,
                       epsilon=1e-3)(x)
      x = nn.leaky_relu(x, 0.2)
    logit = nn.Dense(1, name='real_fake')(x)[..., 0]
    recon = nn.Dense(self.out_dim, name='recon')(x)
    return logit, nn.relu(recon) if self.recon_relu else recon


def init_state(student, disc, g_tx, d_tx, key, x_example) -> MemberState:
  """One member's state: the student's params, optimizer state and batch
  statistics (empty for students without BatchNorm); extras: the
  discriminator's params 'd', batch statistics 'd_stats' and optimizer
  state 'd_opt'."""
  k_g, k_d = jax.random.split(key)
  g_vars = student.init(k_g, x_example)
  g = g_vars['params']
  g_state = {k: v for k, v in g_vars.items() if k != 'params'}
  d_vars = disc.init(k_d, student.apply(g_vars, x_example))
  return MemberState(g, g_tx.init(g), g_state, {
      'd': d_vars['params'], 'd_stats': d_vars['batch_stats'],
      'd_opt': d_tx.init(d_vars['params'])})


def make_member_step(student, disc, g_tx, d_tx, *, mse_target='student_output',
                     adv_weight=1.0, mse_weight=1.0, g_steps_per_d_step=1,
                     regression=None):
  """member_step(state, x, target, key) -> (state, metrics) for the engine.

  target: the student's target dict ({'chunk', ...}, see `tcn_jax.losses`).
  regression(out, target): the student's regression loss (default: MSE of
  out to the chunk), out being the student's output or the discriminator's
  reconstruction (mse_target).
  """
  regression = regression or (lambda out, target: mse(out, target['chunk']))
  if mse_target not in MSE_TARGETS:
    raise TCNError(f'unknown GAN MSE target {mse_target!r} (config.gan.'
                   f'mse_target); choose one of {", ".join(MSE_TARGETS)}')

  def d_loss(d, stats, inp, label, chunk):
    (logit, recon), upd = disc.apply({'params': d, 'batch_stats': stats}, inp,
                                     train=True, mutable=['batch_stats'])
    return bce(logit, label) + mse(recon, chunk), upd['batch_stats']

  def d_step(state, inp, label, chunk):
    e = state.extras
    (loss, stats), grads = jax.value_and_grad(d_loss, has_aux=True)(
        e['d'], e['d_stats'], inp, label, chunk)
    updates, d_opt = d_tx.update(grads, e['d_opt'], e['d'])
    return state.replace(extras=dict(
        e, d=optax.apply_updates(e['d'], updates), d_stats=stats,
        d_opt=d_opt)), loss

  def g_loss(g, state, x, target, key):
    pred, g_state = student.apply(
        {'params': g, **state.model_state}, x, train=True,
        rngs={'dropout': key}, mutable=list(state.model_state))
    logit, recon = disc.apply({'params': state.extras['d'],
                               'batch_stats': state.extras['d_stats']}, pred)
    out = pred if mse_target == 'student_output' else recon
    loss = adv_weight * bce(logit, 1.0) + mse_weight * regression(out, target)
    return loss, (mse(pred, target['chunk']), g_state)

  def member_step(state, x, target, key):
    chunk = target['chunk']
    fake = jax.lax.stop_gradient(student.apply(state.variables(), x))
    state, real_loss = d_step(state, chunk, 1.0, chunk)
    state, fake_loss = d_step(state, fake, 0.0, chunk)
    for k in range(g_steps_per_d_step):
      g_key = key if k == 0 else jax.random.fold_in(key, k)
      (loss, (direct, g_state)), grads = jax.value_and_grad(
          g_loss, has_aux=True)(state.params, state, x, target, g_key)
      updates, g_opt = g_tx.update(grads, state.opt_state, state.params)
      state = state.replace(params=optax.apply_updates(state.params, updates),
                            model_state=g_state, opt_state=g_opt)
    # 'loss' is the student's (generator's) loss, as for FF students.
    return state, {'loss': loss, 'd_loss': (real_loss + fake_loss) / 2,
                   'mse': direct}

  return member_step
