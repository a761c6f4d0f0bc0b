"""distssl: semi-supervised training (FixMatch, FlexMatch, FreeMatch, SoftMatch; distribution alignment)
on DeepSpeed ZeRO from WebDataset shards."""
__version__ = "0.1.0"
