"""WHAT it means: tables, the overhead model and figures, computed from run directories only.

Why this package imports nothing from ``teefl.federation`` or ``teefl.workload`` (and so never
torch or grpc): a report must be producible on a laptop from run directories copied off a TDX or
SGX host. Its only input is the run-directory contract of docs/architecture.md.

Modules: ``loader`` (read run directories), ``summary`` (summary.json; ``run_metrics``: its
accuracy and loss), ``timefmt`` (HH:MM[:SS]), ``mechanisms`` (security configuration -> x_k),
``tables`` (Tables I-III, phases), ``observations`` (the model's input runs), ``perfmodel``
(NNLS overhead model, bootstrap), ``prediction`` (what a fit predicts), ``plots`` (matplotlib,
Agg), ``report`` (report.md).
"""
