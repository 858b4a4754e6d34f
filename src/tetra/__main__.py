"""Lets `python -m tetra` (and so `torchrun -m tetra`) run the CLI.

Entry point: tetra.cli.main.
"""

from tetra.cli import main

raise SystemExit(main())
