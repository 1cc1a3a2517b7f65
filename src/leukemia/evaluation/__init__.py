"""Metrics, plots and the evaluation report written into a run directory."""
