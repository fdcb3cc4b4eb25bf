"""GAN students: strategies agree, the losses do what they say."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tcn_jax import chunking
from tcn_jax import engine
from tcn_jax import gan
from tcn_jax import input_pipeline
from tcn_jax import losses
from tcn_jax import models
from tcn_jax import pipeline
from tcn_jax import students as students_lib
from helpers import needs_fmnist, reuse_teacher
from tcn_jax.errors import TCNError

SPEC = 'C4 MP F D8r Do.1'


def _setup(ids, width=6, n_data=64):
  student = models.student(SPEC, width, impl='im2col')
  disc = gan.Discriminator((16, 32), width)
  rng = np.random.default_rng(0)
  x = rng.random((n_data, 12, 12, 1), np.float32)
  chunks = rng.random((4, n_data, width), np.float32)[ids]
  keys = engine.member_keys(5, ids)
  return student, disc, jnp.asarray(x), jnp.asarray(chunks), keys


def _run(ids, strategy, epochs=2, tx=None, **kw):
  """Trains a group. Plain SGD by default: the Dense biases before BatchNorm
  have an exactly-zero true gradient, and Adam would turn float noise there
  into full-size steps that differ between equally valid programs."""
  student, disc, x, chunks, keys = _setup(ids)
  g_tx = d_tx = tx or optax.sgd(0.05)
  state = engine.stack([gan.init_state(student, disc, g_tx, d_tx, k, x[:2])
                        for k in keys])
  epoch = engine.make_group_epoch(
      gan.make_member_step(student, disc, g_tx, d_tx, **kw), len(ids),
      strategy)
  metrics = []
  for e in range(epochs):
    state, m = epoch(state, x, {'chunk': chunks},
                     input_pipeline.batch_order(1, e, len(x), 16), keys, e)
    metrics.append(m)
  return state, jax.tree_util.tree_map(lambda *a: np.concatenate(a), *metrics)


@pytest.mark.parametrize('mse_target', gan.MSE_TARGETS)
def test_gan_strategies_equal_training_alone(mse_target):
  ids = [0, 1, 3]
  got = {s: _run(ids, s, mse_target=mse_target)[0]
         for s in ('vmap', 'unrolled')}
  for i, member in enumerate(ids):
    alone, _ = _run([member], 'unrolled', mse_target=mse_target)
    for state in got.values():
      jax.tree_util.tree_map(
          lambda a, b, i=i: np.testing.assert_allclose(a[i], b[0], atol=1e-4,
                                                       rtol=1e-4),
          state, alone)


def test_without_adversarial_term_student_output_equals_ff():
  """adv_weight=0 and the paper's MSE target: the student trains exactly as
  an FF student (the discriminator has no influence)."""
  student, _, x, chunks, keys = _setup([0, 1])
  tx = optax.adam(1e-3)
  state, _ = _run([0, 1], 'unrolled', tx=tx, adv_weight=0.0)
  params = engine.stack([gan.init_state(student, gan.Discriminator((16, 32), 6),
                                        tx, tx, k, x[:2]).params for k in keys])
  opt_state = jax.vmap(tx.init)(params)

  def loss_fn(p, xb, tb, key):
    pred = student.apply({'params': p}, xb, train=True, rngs={'dropout': key})
    return losses.mse(pred, tb)

  epoch = engine.make_epoch_fn(loss_fn, tx, 2, 'unrolled')
  for e in range(2):
    params, opt_state, _ = epoch(params, opt_state, x, chunks,
                                 input_pipeline.batch_order(1, e, len(x), 16), keys, e)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), state.params,
      params)


def test_discriminator_learns_and_student_mse_falls():
  _, m = _run([0], 'unrolled', epochs=15, tx=optax.adam(1e-3))
  assert m['mse'][-4:].mean() < m['mse'][:4].mean()
  assert np.isfinite(m['d_loss']).all() and np.isfinite(m['loss']).all()



@pytest.mark.parametrize('mse_target', gan.MSE_TARGETS)
def test_logit_matching_gan_students(mse_target):
  """GAN students with the logit-matching regression term: at weight 0 they
  train exactly as plain GAN students (the {chunk, feature, offset} targets
  give each member its own chunk); at weight 1 they train differently."""
  rng = np.random.default_rng(0)
  x = rng.random((64, 12, 12, 1), np.float32)
  features = rng.standard_normal((64, 16)).astype(np.float32)
  head = models.Head(5, 0.5)
  settings = dict(disc_widths=(16, 32), disc_first_bias=False,
                  recon_relu=False, mse_target=mse_target, adv_weight=1.0,
                  mse_weight=1.0, g_steps_per_d_step=1, d_optimizer='adam',
                  d_learning_rate=2e-4)

  def students(weight=None):
    match = {} if weight is None else dict(
        loss='logit_matching', loss_context=dict(
            head=head,
            head_variables=head.init(jax.random.key(1), features[:1]),
            weight=weight, temperature=2.0,
            chunker=chunking.Chunker(2, 16)))
    groups, info = students_lib.train_students(
        SPEC, x, features, 2, epochs=2, batch_size=16,
        optimizer=students_lib.Optimizer('sgd', 0.05), seed=3,
        strategy='unrolled', nets=students_lib.Nets(impl='im2col'),
        val=(x[:16], features[:16]),
        objective=students_lib.Objective(gan=settings, **match))
    assert all(np.isfinite(m).all() for m in info['val_mse'])
    return groups[0].variables

  plain = students()
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
      students(0.0), plain)
  matched = jax.tree_util.tree_leaves(students(1.0))
  assert any(not np.allclose(a, b) for a, b in
             zip(matched, jax.tree_util.tree_leaves(plain)))

def test_bad_mse_target():
  student, disc, *_ = _setup([0])
  with pytest.raises(TCNError, match=r"unknown GAN MSE target 'pixels' "
                     r'\(config.gan.mse_target\)'):
    gan.make_member_step(student, disc, optax.adam(1e-3), optax.adam(1e-3),
                         mse_target='pixels')


@pytest.mark.slow
@needs_fmnist
def test_gan_pipeline_with_pca_chunks_on_real_subset(smoke_run, tmp_path):
  """GAN students on PCA-balanced chunks, and the head, on the shared smoke
  run's teacher: the run saves the PCA basis with the TCN, and the saved TCN
  predicts what the run reports (FF students on PCA chunks: test_export)."""
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config('gan,smoke')
  config.num_students = 2
  config.gan.mse_target = 'disc_reconstruction'
  config.gan.disc = '16 32'
  config.students.epochs = config.head.epochs = 1   # 3,000 images.
  config.chunking = 'pca'
  workdir = tmp_path / 'run'
  reuse_teacher(smoke_run.workdir, str(workdir))
  results = pipeline.run(config, str(workdir))
  assert results['digests']['teacher'] == (
      smoke_run.results['digests']['teacher'])
  assert results['method'] == 'gan'
  assert results['chunking'] == 'pca (balanced)'
  assert len(results['student_val_mse']) == 2
  assert all(np.isfinite(results['student_val_mse']))
  # GAN students this short are chaotic: whether the TCN beats chance (0.1)
  # is decided by float rounding, which differs between CPU types (an AVX2
  # machine ended at 0.10, 0.102 with --xla_cpu_max_isa=AVX2). What does not
  # depend on it: the saved TCN predicts the accuracy the run reports (the
  # FF teacher's floor is test_pipeline.py's).
  from tcn_jax import assemble  # pylint: disable=g-import-not-at-top
  from tcn_jax import data  # pylint: disable=g-import-not-at-top
  from tcn_jax import metrics  # pylint: disable=g-import-not-at-top
  predict, tcn = assemble.load_tcn(str(workdir / 'tcn'))
  assert tcn.num_students == 2
  assert tcn.basis['matrix'].shape == (256, 256)
  test = data.load(config.data).test
  assert metrics.evaluate(predict, test.x, test.y, config.eval_batch_size
                          ) == pytest.approx(
      results['tcn_test_acc_after_finetune'], abs=1e-3)
  from tcn_jax import checkpoint  # pylint: disable=g-import-not-at-top
  with checkpoint.StageCheckpoint(
      str(workdir / 'students' / 'group0')) as ckpt:
    record = ckpt.record()
  assert {'train_loss', 'train_d_loss', 'train_mse'} <= set(
      record['history'][-1])
