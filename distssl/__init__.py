"""distssl: FixMatch + distribution alignment on DeepSpeed ZeRO, trained from WebDataset shards."""
__version__ = "0.1.0"
