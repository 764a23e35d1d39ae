"""Scoring: metrics, protocols, benchmark sets, reference numbers, and the `edsr-dist eval` command."""
