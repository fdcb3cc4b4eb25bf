"""The one exception type users see: a bad config value, file or workdir."""


class TCNError(Exception):
  """A user-facing error; `main` prints it on one line and exits non-zero."""
