"""The exception types users see: a bad config value, file or workdir, or a
stop signal."""
import signal


class TCNError(Exception):
  """A user-facing error; `main` prints it on one line and exits non-zero."""
  exit_code = 2


class Interrupted(TCNError):
  """SIGTERM/SIGINT stopped the run; exit code 128 + signal number."""

  def __init__(self, signum: int):
    super().__init__(f'stopped by {signal.Signals(signum).name}; the epoch '
                     'in progress (or step, with step checkpoints) was '
                     'finished and saved: run the same command to resume')
    self.exit_code = 128 + signum
