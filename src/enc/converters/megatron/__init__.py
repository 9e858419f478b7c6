"""Megatron-LM BERT / GPT-2 checkpoints -> Hugging Face (see :mod:`.converter`)."""

from enc.converters.megatron.converter import MegatronConverter

__all__ = ["MegatronConverter"]
