"""Sample quality of digit models (``fastddpm eval``): Frechet distance in a digit classifier's features."""

from .metrics import DigitClassifier, evaluate, frechet_distance, load_classifier, train_classifier

__all__ = ["DigitClassifier", "evaluate", "frechet_distance", "load_classifier", "train_classifier"]
