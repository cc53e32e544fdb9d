"""The plumbing: config schema, errors, atomic files, paths, the stage envelope, MLflow tracking
and the reading of runs, downloads, rendering, Hydra callbacks and the Ray worker hook."""
