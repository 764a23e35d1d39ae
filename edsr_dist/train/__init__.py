"""The trainer: the loop, its reporting, and the `edsr-dist train` command."""
