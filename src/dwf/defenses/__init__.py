"""Defenses: how each model is built and trained. One file per defense."""
