"""What the aggregator keeps on disk so that a crash loses no round and counts nothing twice:
`RoundStore`, the one object the server holds, made of parts with one job each.

- `checkpoints.Checkpoints`: after every round the checkpoint (sealed when the plan says so),
  the strategy state, then ``state.json`` naming both, each written atomically (temp file,
  fsync, rename); a restarted aggregator resumes from the last completed round.
- `updates.UpdateStore`: acknowledged updates of the open rounds (in the run directory or a
  shared-memory slot), replayed by a restarted aggregator; uploads are idempotent per
  collaborator and round.
- `cleanup.clean_up`: what a dead aggregator left, cleared by the next one on start-up.
- `sealing.FileSealer`: how each of these files is sealed and its metadata signed
  (``at_rest: sealed``), bound to its run, round, party and kind.

Files are the owner's alone (`teefl.runfiles`: directories 0700, files 0600), and nothing is
read or removed outside the run directory and the staging directory, whatever a metadata file
says.
"""

from __future__ import annotations

from pathlib import Path

from teefl.rundir import RunDir
from teefl.runfiles import private_dir
from teefl.store import cleanup
from teefl.store.checkpoints import Checkpoints
from teefl.store.sealing import FileSealer
from teefl.store.updates import UpdateStore


class RoundStore:
    """Checkpoints, the resume pointer and acknowledged updates of one run directory.

    ``run_id``: bound into every sealed file and metadata MAC (sealed runs), so that another
    run's files are refused. ``staging_dir``: the only directory a staged update is read from
    or removed in (None: staged names are ignored); never used by a sealed store.
    """

    def __init__(
        self,
        run_dir: Path,
        seal_key: bytes | None = None,
        keep: bool = False,
        run_id: str = "",
        staging_dir: Path | None = None,
        mapped: bool = False,
    ) -> None:
        self.run_dir, self.seal_key, self.keep = Path(run_dir), seal_key, keep
        self.rd = RunDir(self.run_dir)  # every path and name of the run directory
        self.run_id = run_id
        self.staging_dir = Path(staging_dir) if staging_dir and seal_key is None else None
        self.files = FileSealer(seal_key, run_id)
        self.mkey = self.files.mkey
        private_dir(self.run_dir)
        self.model_dir = private_dir(self.rd.model_dir)
        self.checkpoints = Checkpoints(self.rd, self.files)
        self.updates = UpdateStore(self.rd, self.files, keep, self.staging_dir)
        self.updates.mapped = mapped  # federation.memory: flat (updates read as maps)
        # the parts' methods, as the server calls them
        self.save_checkpoint = self.checkpoints.save_checkpoint
        self.final_path = self.checkpoints.final_path
        self.load_state = self.checkpoints.load_state
        self.load_resume = self.checkpoints.load_resume
        self.save_update = self.updates.save_update
        self.save_report = self.updates.save_report
        self.commit_staged = self.updates.commit_staged
        self.open_update = self.updates.open_update
        self.open_mapped_update = self.updates.open_mapped_update
        self.discard_update = self.updates.discard_update
        self.load_updates = self.updates.load_updates
        self.drop_updates = self.updates.drop_updates
        self.stored_rounds = self.updates.stored_rounds

    def clean_up(self, completed: int, final: bool = False) -> None:
        """On start-up, before anything is written: remove what a dead aggregator left (see
        `cleanup.clean_up`)."""
        cleanup.clean_up(self.updates, self.model_dir, completed, final)

    def truncate_metrics(self, completed: int) -> None:
        """See `cleanup.truncate_metrics`."""
        cleanup.truncate_metrics(self.rd.metrics, completed)
