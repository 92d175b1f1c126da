"""Files shipped with the AstroMAE package: the demo weights."""

from __future__ import annotations

from importlib import resources

DEMO_FILE = "astromae-demo.safetensors"


def demo_weights_path() -> str:
    """Path of the shipped demo weights file (it may not exist in a fresh checkout)."""
    return str(resources.files(__package__).joinpath("weights", DEMO_FILE))
