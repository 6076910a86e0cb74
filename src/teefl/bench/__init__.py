"""The experiment matrix: ``teefl bench`` runs a study (models x datasets x security
configurations x repeats) as real federations, resumably, and ends with the report and the fit.

- `teefl.bench.study`: the study file (validated like a plan) and the embedded studies
- `teefl.bench.matrix`: cells, their run order, and what this host can run
- `teefl.bench.runner`: running, resuming and reporting a study into one output directory
- `teefl.bench.outdir` (one study per output directory, one runner at a time), `teefl.bench.finish`
  (the report, the fit and the tables at the end)
- `teefl.bench.netns`: every party in its own network namespace, with optional bandwidth caps
- `teefl.bench.slurm` (the driver), `slurm_script` (what is submitted), `slurm_job` (one cell
  inside a job): every cell a Slurm job
"""
