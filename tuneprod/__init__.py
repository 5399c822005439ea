"""tuneprod: hyperparameter search for product-image classifiers (Ray Tune + Optuna TPE + ASHA)."""
from tuneprod.api import dashboard, demo_data, export, predict, report, resume, retrain, search

__all__ = ["search", "resume", "retrain", "predict", "report", "dashboard", "demo_data", "export"]
__version__ = "0.1.0"
