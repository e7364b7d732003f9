"""Server-side Flower strategies for cyclic block training."""

from strategy.cyclic import CyclicBlockStrategy

__all__ = ["CyclicBlockStrategy"]
