"""The Weights & Biases tracker: one W&B run per training run, continued with `wandb.init(id=..., resume="allow")`
(wandb/sdk/wandb_init.py). The account comes from W&B's own variables and files (WANDB_API_KEY, `wandb login`,
WANDB_MODE=offline for no network, WANDB_ENTITY, WANDB_BASE_URL); nothing here reads or writes them. W&B's local
files go to the run folder's `wandb/`, so they travel with the run (and a bucket run uploads them).

Called on the tracker's own thread only (tracking/channel.py).
"""

from __future__ import annotations

import html
from pathlib import Path


class WandbTracker:
    name = "wandb"

    def __init__(self, project: str, run_name: str, folder: Path):
        self.project, self.run_name, self.folder = project, run_name, folder
        self.run = None

    def start(self, run_id: str | None, params: dict) -> str:
        import wandb
        self.folder.mkdir(parents=True, exist_ok=True)
        # console "off": W&B would otherwise wrap this process's stdout/stderr to copy the console into the run.
        settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False)
        # A continued run keeps the settings it was created with; a resumed command line may differ (--resume).
        self.run = wandb.init(project=self.project, name=self.run_name, id=run_id, resume="allow" if run_id else None,
                              dir=str(self.folder), config=None if run_id else params, settings=settings)
        return self.run.id

    def last_steps(self) -> dict[str, int]:
        """W&B keeps a continued run's step itself (and drops a log below it); offline it cannot be asked."""
        return {}

    def where(self) -> str:
        return f"W&B run {self.run.id} (project {self.project!r}{', offline' if self.run.offline else ''})"

    def log_metrics(self, records: list[tuple[dict[str, float], int]]) -> None:
        for values, step in records:
            self.run.log(values, step=step)

    def log_file(self, path: Path, folder: str, step: int) -> None:
        import wandb
        if path.suffix.lower() == ".png":
            self.run.log({f"{folder}/{path.stem}": wandb.Image(str(path))}, step=step)
            return
        artifact = wandb.Artifact(f"{self.run.id}-{folder}", type=folder)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def log_text(self, text: str, name: str) -> None:
        import wandb
        self.run.log({Path(name).stem: wandb.Html(f"<pre>{html.escape(text)}</pre>")})

    def finish(self, completed: bool) -> None:
        self.run.finish(exit_code=0 if completed else 1)
