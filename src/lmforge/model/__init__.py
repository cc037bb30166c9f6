from lmforge.model.config import PRESETS, ModelConfig
from lmforge.model.transformer import GPT

__all__ = ["GPT", "ModelConfig", "PRESETS"]
