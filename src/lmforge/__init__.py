"""lmforge: train Transformer language models in practice, from raw text to a served model."""

__version__ = "0.1.0"
