"""Orbax checkpoints for each stage, and workdir bookkeeping.

Each stage (teacher, students, head) owns `workdir/<stage>/` managed by an
Orbax `CheckpointManager`, saved after every epoch: parameters, optimizer
state and a JSON record (epoch, history). Running the same command again
resumes from the latest epoch, and a stage whose last epoch is saved is
skipped. The assembled TCN is one more checkpoint (see `assemble`).
"""
import json
import os

import jax
import orbax.checkpoint as ocp

from tcn_jax.errors import TCNError


class StageCheckpoint:
  """Per-epoch checkpoints of one training stage."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def latest_epoch(self) -> int:
    """Number of finished epochs saved (0 = nothing saved)."""
    return self.manager.latest_step() or 0

  def save(self, epoch: int, state, record: dict):
    self.manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)))
    self.manager.wait_until_finished()

  def restore(self, state_template):
    """(state, record) of the latest epoch, shaped like `state_template`."""
    epoch = self.latest_epoch()
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      state_template)
    try:
      out = self.manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          record=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises several types for bad checkpoints.
      raise TCNError(f'cannot restore checkpoint {self.directory}/{epoch} '
                     f'(another architecture or a damaged file?): '
                     f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
                     ) from None
    return out.state, out.record

  def close(self):
    self.manager.close()


def write_json(path: str, obj):
  """Writes JSON atomically (temp file + rename), so a crash never truncates."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
