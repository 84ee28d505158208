"""fedcare: federated learning for hospitals on Flower, with differential privacy the site enforces."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
