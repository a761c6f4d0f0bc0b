"""Models: timm's factory with local pretrained weights (factory.py), the WRN-28-2 of the papers
registered with timm (wrn.py), and the export that timm loads (export.py)."""
