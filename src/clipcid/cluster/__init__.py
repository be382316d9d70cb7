"""`clipcid cluster` (run.py) and the clusters folder it writes (artifact.py)."""

from clipcid.cluster.run import ClusterConfig, cluster

__all__ = ["ClusterConfig", "cluster"]
