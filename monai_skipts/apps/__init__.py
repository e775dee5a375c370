"""Offline datasets for demos and tests."""

from .phantom import make_phantom_dataset, make_phantom_image, shepp_logan

__all__ = ["make_phantom_dataset", "make_phantom_image", "shepp_logan"]
