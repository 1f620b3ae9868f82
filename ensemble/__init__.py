"""Blend ensemble members' validation/test predictions; imports without TensorFlow."""

from ensemble.blend import METHODS, Blender, apply_blend

__all__ = ["METHODS", "Blender", "apply_blend"]
