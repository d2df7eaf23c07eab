"""``memgen eval``'s building blocks; ``stages/evaluate.py`` runs them, top to bottom.

- ``plan``: what runs (artifacts and their memory modes, tasks and their options, batches)
- ``heldout``: eval data kept apart from training data (data seeds, contamination warnings)
- ``stats``: each row's accuracy and its paired figure against its task's first row
- ``report``: what a run leaves (``metrics.json``, ``predictions.jsonl``) and its tables
"""
