"""digit-pipeline: a reproducible, swept and tracked Keras MLP on MNIST (DVC + Hydra + MLflow)."""

import os

# Quiet TensorFlow's C++ start-up banner (oneDNN, CPU feature notes) before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow 3 phones home by default; a pipeline users run offline should not.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
