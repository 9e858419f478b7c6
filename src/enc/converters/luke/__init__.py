"""studio-ousia LUKE / mLUKE checkpoints -> Hugging Face (see :mod:`.converter`)."""

from enc.converters.luke.converter import LukeConverter

__all__ = ["LukeConverter"]
