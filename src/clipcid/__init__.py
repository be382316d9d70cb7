"""clipcid: CLIP-CID distillation (cluster-instance discrimination) on top of open_clip.

Importing the package does nothing but define it. The stages make the project's model configs known to
open_clip when they need them; to use them with open_clip directly, call
`clipcid.models.register_model_configs()` (or load an exported folder: `clipcid export`).
"""

__version__ = "0.1.0"
