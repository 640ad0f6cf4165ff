"""Row normalisation shared by the text encoders, prompt averaging and the retrieval metrics."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Unit rows as float32; all-zero rows stay zero instead of NaN; no copy when already unit (60k x 512)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.allclose(norms, 1.0, rtol=0.0, atol=1e-6):
        return x
    return x / np.maximum(norms, eps)
