"""Ray Tune learning-rate sweeps over the real trainer, and promotion of the best adapter."""
