"""Evaluation: the harness (calibrate on validation, score a split), metrics, the report, the reference and ceiling
rows and the baselines."""
