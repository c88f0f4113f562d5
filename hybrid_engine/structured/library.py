"""The grammar library behind structured output (llguidance), imported on first use."""
from __future__ import annotations

from typing import Any

from ..errors import require

EXTRA = "structured"  # pip install "hybrid-engine[structured]"


def load_llguidance() -> Any:
    """The llguidance module, or OptionalDependencyError naming the extra that installs it."""
    return require("llguidance", EXTRA)
