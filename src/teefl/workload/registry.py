"""`WORKLOADS`: every workload a plan can name, found but not run.

Why a module of its own: both the resolver (`teefl.workload.resolve`, which runs a workload) and
the digest (`teefl.workload.digest`, which hashes one without running it) look references up
here; neither has to import the other for it.
"""

from __future__ import annotations

from teefl.registry import Registry
from teefl.workload.api import workload_problem

#: every workload a plan can name; built-ins are imported only when used
WORKLOADS: Registry[type] = Registry(
    "workload",
    "teefl.workloads",
    lambda obj: workload_problem(obj) is None,
    "a workload (a class with build_model, load, train and evaluate)",
    why=workload_problem,
    files=True,
    lazy={
        "vision": "teefl.workload.vision:Vision",
        "image-folder": "teefl.workload.image_folder:ImageFolderWorkload",
        "tabular": "teefl.workload.tabular:Tabular",
        "noop": "teefl.workload.noop:NoOp",
    },
)
