"""The science: data, models, training, statistics and figures. Imports no Hydra, no MLflow and
nothing from pipeline.infra but its leaf modules errors and files (tests/test_architecture.py)."""
