"""Experiments and reports built on top of the d2prune library: the transfer study, the benchmarks,
the peer comparison, and the renderers of reports (markdown, HTML, plots).

Code here may import `d2prune`; the library never imports this package. The CLIs in `tools/` put
the repository root on `sys.path` to reach it.
"""
