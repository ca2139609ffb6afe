"""`python -m codegen_lm ...` (and `torchrun -m codegen_lm train ...`) runs the command line."""

import sys

from .cli import main

sys.exit(main())
