"""Checkpoints: the complete-or-invisible folder layout (layout.py), what a run saves and how it
resumes (state.py), and the world-size-independent state for a resume on another number of ranks
(elastic.py)."""
