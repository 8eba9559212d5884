"""StoryGPT-V model library: torch + diffusers + transformers. Never imports ray."""

from storygpt.compat import ensure_torchvision

ensure_torchvision()  # before anything imports torchvision (see storygpt/compat.py)

__version__ = "0.1.0"
