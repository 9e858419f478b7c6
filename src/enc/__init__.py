"""enc: original transformer checkpoints to the Hugging Face layout, proven correct."""

__version__ = "0.1.0"
