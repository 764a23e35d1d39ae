"""The network and what shapes its training: EDSR, precision and autocast, learning-rate schedules, the EMA."""
