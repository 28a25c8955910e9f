"""`$HERD_HOME`: where herd keeps its state on this machine (default `~/.cache/herd`)."""

from __future__ import annotations

import os
from pathlib import Path


def herd_home() -> Path:
    """Where herd keeps its state, synthetic checkpoints, API keys and redis-server's pid and log."""
    return Path(os.environ.get("HERD_HOME") or Path.home() / ".cache" / "herd")
