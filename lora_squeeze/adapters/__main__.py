"""``python -m lora_squeeze.adapters``: the ``lora-squeeze`` command."""

import sys

from lora_squeeze.adapters.cli import main

if __name__ == "__main__":
  sys.exit(main())
