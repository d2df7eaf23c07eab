"""Analysis behind ``memgen inspect-memory``: probes, clusters, plots and reports.

- ``probe.py``: what one answer's latents say and do (nearest tokens, logit lens, norms,
  attention mass, teacher-forced and generated ablations);
- ``slots.py``: the same for a ``memory.inject: kv`` memory (keys and values at K slots,
  every layer): attention per layer, slot norms, ablations; ``views.py``: which views apply
  to which memory, and why not;
- ``clusters.py``: many insertions at once (mean-pool, k-means, PCA/t-SNE, drop-cluster rule);
- ``plots.py``: the matplotlib figures; ``report.py``: JSON records and files;
  ``terminal.py``: the rich terminal view;
  ``html.py``: the self-contained HTML page.

Everything here reads a model and a trace; nothing writes to an artifact.
"""
