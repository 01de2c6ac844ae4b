"""``python3 -m smt_droplet`` — what the systemd units on the droplet run."""

import sys

from .cli import main

sys.exit(main())
