"""MEGA (facebookresearch/mega fairseq checkpoints and the Colab wrapper HF converted from) -> HF MEGA."""

from enc.converters.mega.converter import MegaConverter

__all__ = ["MegaConverter"]
