"""Students' views drawn on device (`config.students.views`, augment.view):
what each augmentation does to a batch, that every member and the online
teacher see the same view, and that in-memory online features equal the
streamed ones."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tcn_jax import augment
from tcn_jax import engine
from tcn_jax.state import MemberState

_X = np.random.default_rng(0).random((16, 8, 8, 2)).astype(np.float32)


def _view(name, seed=0, x=_X):
  return np.asarray(augment.view(augment.get(name), jax.random.key(seed),
                                 jnp.asarray(x))[0])


def test_flip_mirrors_some_images_and_keeps_the_others():
  out = _view('flip')
  flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, _X)]
  kept = [np.array_equal(o, x) for o, x in zip(out, _X)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert any(flipped) and any(kept)


def test_pad_crop_is_a_window_of_the_padded_image():
  aug = augment.Augmentation('crop only', pad=0.125)   # 1 pixel of 8.
  out = np.asarray(augment.view(aug, jax.random.key(3), jnp.asarray(_X))[0])
  padded = np.pad(_X, ((0, 0), (1, 1), (1, 1), (0, 0)))
  offsets = []
  for o, p in zip(out, padded):
    found = [(dy, dx) for dy in range(3) for dx in range(3)
             if np.array_equal(o, p[dy:dy + 8, dx:dx + 8])]
    assert found, 'not a window of the padded image'
    offsets.append(found[0])
  assert len(set(offsets)) > 1   # Each image draws its own offset.


def test_mixup_is_a_convex_mix_with_the_next_image():
  out = _view('mixup', 5)
  partner = np.roll(_X, 1, axis=0)
  lam = ((out - partner) * (_X - partner)).sum() / ((_X - partner) ** 2).sum()
  assert 0 < lam < 1
  np.testing.assert_allclose(out, lam * _X + (1 - lam) * partner, atol=1e-5)


def test_mixup_mixes_the_labels_as_the_images():
  """The head's loss on a mixup view: CE to both labels, weighted as their
  images were mixed; views without mixup leave the labels alone."""
  from tcn_jax import losses  # pylint: disable=g-import-not-at-top
  labels = np.arange(32, dtype=np.int32).reshape(2, 16) % 3
  x, t = augment.view(augment.get('mixup'), jax.random.key(5),
                      jnp.asarray(_X), {'label': jnp.asarray(labels)})
  np.testing.assert_array_equal(np.asarray(x), _view('mixup', 5))
  partner = np.roll(_X, 1, axis=0)
  lam = ((np.asarray(x) - partner) * (_X - partner)).sum() / (
      (_X - partner) ** 2).sum()
  np.testing.assert_array_equal(t['mixed_label'], np.roll(labels, 1, axis=1))
  np.testing.assert_allclose(t['mix_weight'], np.full((2, 16), lam),
                             atol=1e-5)
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(16, 3)))
  got = losses.classification(logits, {k: v[0] for k, v in t.items()})
  want = (lam * losses.ce(logits, labels[0])
          + (1 - lam) * losses.ce(logits, np.roll(labels[0], 1)))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  _, kept = augment.view(augment.get('pad_crop_flip'), jax.random.key(5),
                         jnp.asarray(_X), {'label': jnp.asarray(labels)})
  assert set(kept) == {'label'}


def test_same_key_same_view_other_key_other_view():
  a, b = _view('pad_crop_flip_mixup', 1), _view('pad_crop_flip_mixup', 1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, _view('pad_crop_flip_mixup', 2))


@pytest.mark.parametrize('name', ['mirror', 'crop_flip'])
def test_views_refuse_what_cannot_run_on_device(name):
  from tcn_jax.errors import TCNError  # pylint: disable=g-import-not-at-top
  with pytest.raises(TCNError, match='config.students.views'):
    augment.check_view(name)


def test_members_and_targets_see_the_same_view():
  """With a view, member m's target is computed from the view the member
  trains on: a student that learns the identity through the view reaches
  zero loss only if both see the same images (two members, one view)."""
  x = _X.reshape(16, -1)[:, :6]

  def loss_fn(p, xb, tb, key):
    del key
    return jnp.mean((xb - tb['chunk']) ** 2) + 0 * p['w'].sum()

  def view_fn(key, xb, tb):
    return xb + jax.random.normal(key, xb.shape), tb

  target_fn = lambda ctx, xb: {'chunk': jnp.stack([xb, xb])}
  tx = optax.sgd(0.0)
  trainer = engine.Trainer(engine.gradient_step(loss_fn, tx), 2, 'vmap',
                           target_fn=target_fn, view=(view_fn, 7))
  p = {'w': jnp.zeros((2, 3))}
  state = MemberState(p, jax.vmap(tx.init)(p))
  order = np.arange(16).reshape(2, 8)
  _, m = trainer(state, engine.Resident(x, {}, order),
                 engine.member_keys(0, [0, 1]), 0, 0, jnp.zeros(()))
  np.testing.assert_array_equal(np.asarray(m['loss']), 0.0)


def test_view_depends_on_epoch_and_step_not_on_the_members():
  """The views of a member trained alone equal its views in a group."""
  x = _X.reshape(16, -1)[:, :4]
  got = {}
  for ids in ([0], [0, 1]):
    def loss_fn(p, xb, tb, key):
      del tb, key
      return jnp.mean((xb - p['w']) ** 2)
    tx = optax.sgd(0.1)
    trainer = engine.Trainer(engine.gradient_step(loss_fn, tx), len(ids),
                             'unrolled', view=(
                                 lambda k, xb, tb: (
                                     xb * jax.random.uniform(k), tb), 3))
    p = {'w': jnp.zeros((len(ids), 4))}
    state = MemberState(p, jax.vmap(tx.init)(p))
    state, _ = trainer(state, engine.Resident(x, {}, np.arange(16).reshape(
        4, 4)), engine.member_keys(0, ids), 2)
    got[len(ids)] = np.asarray(state.params['w'][0])
  np.testing.assert_array_equal(got[1], got[2])


def _train_online(views, gan=None):
  """Two students of a toy teacher's features, computed online from each
  batch's view, for 2 epochs in memory: (their variables, info)."""
  from tcn_jax import chunking  # pylint: disable=g-import-not-at-top
  from tcn_jax import features  # pylint: disable=g-import-not-at-top
  from tcn_jax import models  # pylint: disable=g-import-not-at-top
  from tcn_jax import students  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(1).random((80, 8, 8, 1)).astype(np.float32)
  teacher = models.Teacher('C4 MP F D12r', 3, 0.0, 'auto', False)
  t_vars = teacher.init(jax.random.key(0), x[:1])
  f_val = features.teacher_features(teacher, t_vars, x[64:])
  chunker = chunking.fit('contiguous', f_val, 2)
  groups, info = students.train_students(
      'C4 MP F D8r', x[:64], None, 2, epochs=2, batch_size=16,
      val=(x[64:], chunker.encode(f_val)), objective=students.Objective(
          gan=gan, online={'teacher': teacher, 'variables': t_vars,
                           'chunker': chunker, 'views': views}))
  return jax.tree_util.tree_leaves(groups[0].variables), info


def test_online_views_train_students_in_memory_deterministically():
  runs = [_train_online(v) for v in ('pad_crop_flip_mixup',
                                     'pad_crop_flip_mixup', '')]
  for a, b in zip(runs[0][0], runs[1][0]):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(runs[0][0],
                                                      runs[2][0]))
  assert np.all(np.isfinite(runs[0][1]['val_mse']))


def test_gan_students_train_on_online_mixup_views():
  """GAN students (`:consistent` with `--config.method=gan`) on online
  mixup views: seeded, and trained otherwise than FF students."""
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  from tcn_jax import config  # pylint: disable=g-import-not-at-top
  from tcn_jax import students  # pylint: disable=g-import-not-at-top
  c = fashion_mnist.get_config('consistent')
  c.method = 'gan'
  settings = students.gan_settings(config.resolve(c))
  a, b = (_train_online('mixup', settings) for _ in range(2))
  for u, v in zip(a[0], b[0]):
    np.testing.assert_array_equal(u, v)
  ff = _train_online('mixup')
  assert any(not np.array_equal(u, v) for u, v in zip(a[0], ff[0]))
  assert np.all(np.isfinite(a[1]['val_mse']))


def test_evaluate_sees_every_student_after_each_epoch():
  """train_students(evaluate=...) runs after each epoch on all students'
  concatenated outputs; after the last it is what the trained students give
  (the TCN curve's last point is the TCN before head fine-tuning)."""
  from tcn_jax import students  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(2).random((48, 8, 8, 1)).astype(np.float32)
  f = np.random.default_rng(3).random((48, 6)).astype(np.float32)
  probe = x[:5]
  seen = []
  groups, info = students.train_students(
      'C4 MP F D8r', x, f, 2, epochs=3, batch_size=16, val=(x[:8], f[:8]),
      evaluate=lambda outputs: seen.append(np.asarray(outputs(probe))) or {
          'tcn_probe': float(len(seen))})
  assert len(seen) == 3 and seen[0].shape == (5, 6)
  assert [h['tcn_probe'] for h in info['history'][0]] == [1.0, 2.0, 3.0]
  model = groups[0].model('auto', None)
  final = [np.asarray(model.apply(jax.tree_util.tree_map(lambda a, i=i: a[i],
                                                         groups[0].variables),
                                  probe)) for i in range(2)]
  np.testing.assert_allclose(seen[-1], np.concatenate(final, -1), atol=1e-6)
