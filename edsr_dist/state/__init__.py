"""What a run leaves on disk: atomic writes, checkpoints, weight import/export, weights-only loading, the run folder."""
