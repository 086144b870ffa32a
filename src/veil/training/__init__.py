"""One training loop for every defense, and run folders (train, resume, reload, export)."""

from veil.training.loop import TrainConfig, accuracy, fit
from veil.training.run import build, client_cost, export_run, load_run, obfuscate, train_run

__all__ = ["TrainConfig", "accuracy", "build", "client_cost", "export_run", "fit", "load_run", "obfuscate", "train_run"]
