"""`clipcid embed` (run.py) and the embeddings folder it writes (artifact.py)."""

from clipcid.embed.run import EmbedConfig, PairEncoder, embed, project_embeddings

__all__ = ["EmbedConfig", "PairEncoder", "embed", "project_embeddings"]
