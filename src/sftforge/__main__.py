"""`python -m sftforge ...`, as torchrun runs it: `torchrun --nproc_per_node N -m sftforge train`."""

import sys

from sftforge.cli.main import main

sys.exit(main())
