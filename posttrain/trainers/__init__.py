"""Trainers: one shared base over transformers.Trainer (`base.py`) and one module per method."""
