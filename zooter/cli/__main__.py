"""`python -m zooter.cli ...` (what `torchrun` and `accelerate launch` start)."""

import sys

from zooter.cli import main

sys.exit(main())
