"""teefl on a Slurm cluster: studies whose cells are jobs, federations whose parties are tasks.

- `teefl.slurm.client`: sbatch / squeue / scontrol / scancel, their answers and their errors
- `teefl.slurm.federation`: ``teefl slurm federation``: one job, one task per party
- the study side (cells as a job array) is `teefl.bench.slurm`, an executor of ``teefl bench``
"""
