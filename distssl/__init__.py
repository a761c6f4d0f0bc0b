"""distssl: semi-supervised training (FixMatch and its family: the adaptive thresholds, UDA, the
consistency methods; distribution alignment) on DeepSpeed ZeRO from WebDataset shards."""
__version__ = "0.1.0"
