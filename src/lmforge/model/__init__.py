"""Models: ModelConfig and presets (model.config), shared layers (model.layers), stacks (model.transformer).

Kept free of imports so that reading a config does not load torch."""
