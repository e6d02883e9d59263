"""Rotary position embedding frequencies, computed once with numpy.

Scaling variants change only the inverse frequencies, so both backends share this code and
see identical tables.
"""

from __future__ import annotations

import math

import numpy as np

from lorafit.core.errors import LorafitError

SUPPORTED_SCALING = ("default", "linear", "llama3")


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """(head_dim/2,) float32 inverse frequencies, after the configured scaling."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (theta ** exponents.astype(np.float64))).astype(np.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return (inv_freq / float(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    raise LorafitError(f"rope scaling {kind!r} is not supported; supported: "
                       f"{', '.join(SUPPORTED_SCALING)}")


def _llama3(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1's band-wise scaling: long wavelengths divided by `factor`, short ones
    kept, the band between smoothly interpolated."""
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_partial_rope(ops, x, cos, sin, rotary_dim: int):
    """RoPE on the first `rotary_dim` dims of each head of x (B, H, T, D), the rest passed
    through (partial_rotary_factor < 1); cos/sin are tables for rotary_dim."""
    if rotary_dim == x.shape[-1]:
        return ops.apply_rope(x, cos, sin)
    return ops.concat([ops.apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]],
                      axis=-1)
