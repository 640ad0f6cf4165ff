"""Serving: what a trained model is for after evaluation: a saved gallery index, image queries against it."""
