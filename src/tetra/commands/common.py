"""Output helpers several commands share.

Entry point: print_json.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def print_json(value: Any) -> None:
    """One JSON object on stdout, for --json."""
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
