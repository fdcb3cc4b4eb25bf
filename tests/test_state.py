"""One member state: the checkpoint layouts, old and new, read back alike."""
import jax
import numpy as np
import pytest

from tcn_jax import checkpoint
from tcn_jax import state as state_lib
from tcn_jax.state import MemberState


def _template():
  return MemberState(
      params={'w': np.zeros((2, 3), np.float32)},
      opt_state={'count': np.zeros((2,), np.int32)},
      model_state={'batch_stats': {'mean': np.zeros((2, 3), np.float32)}},
      extras={'d': {'k': np.zeros((2, 4), np.float32)},
              'd_opt': {'count': np.zeros((2,), np.int32)}})


def _filled(t, value):
  return jax.tree_util.tree_map(lambda a: np.full_like(a, value), t)


@pytest.mark.parametrize('layout', ['new', 'gan', 'kdgan'])
def test_restore_reads_every_layout(tmp_path, layout):
  saved = _filled(_template(), 3)
  if layout == 'new':
    tree = state_lib.to_tree(saved)
  else:   # Workdirs written before MemberState.
    p, ms, opt = {'gan': ('g', 'g_state', 'g_opt'),
                  'kdgan': ('c', 'c_state', 'c_opt')}[layout]
    tree = {p: saved.params, ms: saved.model_state, opt: saved.opt_state,
            **saved.extras}
  with checkpoint.StageCheckpoint(str(tmp_path)) as ckpt:
    ckpt.save(1, tree, {'history': []})
  with checkpoint.StageCheckpoint(str(tmp_path)) as ckpt:
    got, record = state_lib.restore(ckpt, _template())
  assert record == {'history': []}
  assert isinstance(got, MemberState)
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(saved)):
    np.testing.assert_array_equal(a, b)


def test_plain_model_layout_is_unchanged():
  """A model without model state or extras keeps the layout checkpoints
  always had: {'params', 'opt_state'}."""
  s = MemberState({'w': np.ones(2)}, {'count': np.zeros(())})
  assert set(state_lib.to_tree(s)) == {'params', 'opt_state'}
  assert s.variables() == {'params': {'w': s.params['w']}}
