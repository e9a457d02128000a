"""`python -m sftforge ...`, as torchrun runs it: `torchrun --nproc_per_node N -m sftforge train`."""

import sys

from .cli import main

sys.exit(main())
