"""Training and evaluation jobs that run on Ray and log to MLflow, plus the `tessera` command line."""
