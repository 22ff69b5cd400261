"""The one exception of the ``lora-squeeze`` command and the adapter file formats."""


class AdapterError(Exception):
  """A user error (bad input files or arguments): the CLI prints its one-line message and exits 2."""
