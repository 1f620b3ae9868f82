"""Blend ensemble members' validation/test predictions; imports without TensorFlow."""

from ensemble.blend import Blender, apply_blend
from ensemble.spec import METHODS, BlendSpec, SpecError

__all__ = ["METHODS", "BlendSpec", "Blender", "SpecError", "apply_blend"]
