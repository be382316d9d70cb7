"""clipcid: CLIP-CID distillation (cluster-instance discrimination) on top of open_clip."""

from clipcid.models import register_model_configs

__version__ = "0.1.0"

# Importing clipcid makes the project's model configs visible to open_clip, so that
# open_clip.create_model_and_transforms("clipcid-tiny", pretrained=PATH) works after `import clipcid`.
register_model_configs()
