"""Out of process: `edsr-dist launch` (flags, plans, workers, supervision), rank tables and hostfiles."""
