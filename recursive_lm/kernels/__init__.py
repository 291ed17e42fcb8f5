"""Native CPU kernels (XLA FFI) and the weight layouts they read."""
from recursive_lm.kernels.native import status
from recursive_lm.kernels.panel import from_panels, panel_matmul, to_panels

__all__ = ["from_panels", "panel_matmul", "status", "to_panels"]
