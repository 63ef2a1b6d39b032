"""``python -m lostlm`` (and ``torchrun -m lostlm``) is the ``lostlm`` command."""

import sys

from .cli import main

sys.exit(main())
