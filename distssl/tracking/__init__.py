"""What a run reports: progress, metrics.jsonl and curves (metrics.py), and the trackers behind it:
TensorBoard, MLflow, W&B (loggers.py)."""
