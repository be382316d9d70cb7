"""Loss families of CLIP-CID: cluster-level (PartialFC), instance-level, and baselines.
The plain CLIP loss is open_clip's ClipLoss."""
