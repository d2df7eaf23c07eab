"""Analysis behind ``memgen inspect-memory``: probes, clusters, plots and reports.

- ``probe.py``: what one answer's latents say and do (nearest tokens, logit lens, norms,
  attention mass, teacher-forced and generated ablations);
- ``clusters.py``: many insertions at once (mean-pool, k-means, PCA/t-SNE, drop-cluster rule);
- ``plots.py``: the matplotlib figures; ``report.py``: JSON records, terminal view, files;
  ``html.py``: the self-contained HTML page.

Everything here reads a model and a trace; nothing writes to an artifact.
"""
