"""One member's training state, for every stage: the teacher, FF and GAN
students, the head, the KD and KDGAN baselines.

A `MemberState` holds the trained model's parameters, its optimizer state,
its model state (mutable collections such as BatchNorm statistics) and the
method's extras (a GAN student's or KDGAN classifier's discriminator and its
optimizer). A group's state is one `MemberState` whose leaves have a
leading member axis. `variables()` is the one way back to Flax variables.

On disk (`checkpoint.StageCheckpoint`) a state is the dict `to_tree` makes;
`restore` also reads the layouts that workdirs written before this record
used (the only place that knows them).
"""
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class MemberState:
  """params, opt_state, model_state ({} without mutable collections) and
  extras ({} for plain gradient descent)."""
  params: Any
  opt_state: Any
  model_state: Any = flax.struct.field(default_factory=dict)
  extras: Any = flax.struct.field(default_factory=dict)

  def variables(self) -> dict:
    """The Flax variables {'params', **model_state} of the trained model."""
    return {'params': self.params, **self.model_state}


def to_tree(state: MemberState) -> dict:
  """The checkpointed dict: params, opt_state and, when not empty,
  model_state and extras (so a plain model's layout is what it always
  was)."""
  tree = {'params': state.params, 'opt_state': state.opt_state}
  if state.model_state:
    tree['model_state'] = state.model_state
  if state.extras:
    tree['extras'] = state.extras
  return tree


# Layouts of checkpoints written before MemberState: top-level key of the
# trained model's params -> (params, model_state, opt_state) keys; the other
# keys were the extras.
_LEGACY = {'g': ('g', 'g_state', 'g_opt'),    # GAN students.
           'c': ('c', 'c_state', 'c_opt')}    # KDGAN classifier.


def from_tree(tree: dict) -> MemberState:
  """The MemberState of a checkpointed dict (either layout)."""
  for key, (p, ms, opt) in _LEGACY.items():
    if key in tree:
      extras = {k: v for k, v in tree.items() if k not in (p, ms, opt)}
      return MemberState(tree[p], tree[opt], tree.get(ms, {}), extras)
  return MemberState(tree['params'], tree['opt_state'],
                     tree.get('model_state', {}), tree.get('extras', {}))


def _legacy_tree(state: MemberState, key: str) -> dict:
  p, ms, opt = _LEGACY[key]
  return {p: state.params, ms: state.model_state, opt: state.opt_state,
          **state.extras}


def restore(ckpt, template: MemberState, abstract=lambda tree: tree):
  """(MemberState, record) of `ckpt`'s latest epoch, shaped like
  `template`; abstract(tree) -> the restore target of a tree (shardings)."""
  stored = ckpt.stored_keys()
  legacy = [k for k in _LEGACY if k in stored]
  tree = (_legacy_tree(template, legacy[0]) if legacy
          else to_tree(template))
  out, record = ckpt.restore(abstract(tree))
  return from_tree(out), record


def unstack_variables(state: MemberState, i: int = 0) -> dict:
  """Member i's Flax variables, of a group's stacked state."""
  return jax.tree_util.tree_map(lambda a: a[i], state.variables())
