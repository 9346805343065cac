"""`python -m center_embed.cli` (and `torchrun -m center_embed.cli train ...`)."""

import sys

from center_embed.cli import main

sys.exit(main())
