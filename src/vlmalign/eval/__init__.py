"""Evaluation: benchmark readers, scorers and judges."""
