"""Peer methods for the benchmarks, on the same frozen teachers as Skip-TS.

- :class:`PatchCore` (Roth et al., CVPR 2022): a memory bank of locally aware patch features of the
  training normals, sub-sampled by greedy coreset selection; a test patch's anomaly score is its
  distance to the nearest memory entry.
"""

from .patchcore import PatchCore, greedy_coreset

__all__ = ["PatchCore", "greedy_coreset"]
