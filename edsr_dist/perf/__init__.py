"""Measuring: training speed (`edsr-dist bench`) and inference speed (`edsr-dist bench-sr`)."""
