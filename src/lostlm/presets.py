"""The named model shapes (``model.preset``): LLaMA sizes of the GaLore/LOST papers."""

from __future__ import annotations

# hidden / intermediate / heads / layers (the LLaMA shapes of the GaLore/LOST papers); default LOST rank per size.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_heads=4, num_layers=4, rank=64),
    "9m": dict(hidden_size=128, intermediate_size=352, num_heads=4, num_layers=4, rank=32),
    "20m": dict(hidden_size=256, intermediate_size=688, num_heads=4, num_layers=4, rank=64),
    "60m": dict(hidden_size=512, intermediate_size=1376, num_heads=8, num_layers=8, rank=128),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_heads=12, num_layers=12, rank=256),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_heads=16, num_layers=24, rank=256),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_heads=32, num_layers=24, rank=512),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_heads=32, num_layers=32, rank=1024),
}
PRESET_VOCAB = 32000  # the T5 / Llama tokenizers of the paper recipes
