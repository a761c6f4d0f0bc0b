"""Label the bucket: a trained model's predictions for every image of a data spec, as Parquet parts.

``model.py`` loads an exported model (a run folder or its ``model.safetensors``) with the run's own
eval transform; ``parts.py`` cuts the input into parts (a shard each, or a run of raw inputs);
``run.py`` predicts the parts a rank owns, each written atomically, and summarises them.
"""
