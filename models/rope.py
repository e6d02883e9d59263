"""Rotary position embedding frequencies, computed once with numpy.

Scaling variants change only the inverse frequencies, so both backends share this code and
see identical tables.
"""

from __future__ import annotations

import math

import numpy as np

from lorafit.core.errors import LorafitError

SUPPORTED_SCALING = ("default", "linear", "llama3", "yarn")


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
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
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


def attention_factor(scaling: dict | None) -> float:
    """The factor YaRN multiplies the cos and sin tables by (1 for other scalings):
    `attention_factor` if given, else 0.1 * ln(factor) + 1 (scaled by mscale /
    mscale_all_dim when both are given), as transformers' _compute_yarn_parameters."""
    s = scaling or {}
    if s.get("rope_type", s.get("type")) != "yarn":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    factor = float(s["factor"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if s.get("mscale") and s.get("mscale_all_dim"):
        return float(mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]))
    return mscale(factor)


def _yarn(head_dim: int, theta: float, s: dict) -> np.ndarray:
    """YaRN (arXiv 2309.00071): frequencies that rotate fewer than beta_slow times over the
    original context are interpolated (divided by `factor`), those rotating more than
    beta_fast times kept, with a linear ramp between (bounds floored/ceiled unless
    `truncate` is false, as gpt-oss sets)."""
    factor = float(s["factor"])
    old_len = float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)
    pos_freqs = (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
                 ).astype(np.float32)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def correction_dim(rotations):
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # share of the original (extrapolated) frequency
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)
