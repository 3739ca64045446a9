"""Distillation wrappers: training-time modules that pair a student with a frozen teacher."""
