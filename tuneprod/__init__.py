"""tuneprod: hyperparameter search for product-image classifiers (Ray Tune + Optuna TPE + ASHA)."""
from tuneprod.api import demo_data, predict, resume, retrain, search

__all__ = ["search", "resume", "retrain", "predict", "demo_data"]
__version__ = "0.1.0"
