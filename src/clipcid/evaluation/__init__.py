"""Zero-shot classification, linear probe and retrieval, the way CLIP_benchmark measures them."""
