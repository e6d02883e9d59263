"""Rotary position embedding frequencies, computed once with numpy.

Scaling variants change only the inverse frequencies, so both backends share this code and
see identical tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lorafit.core.errors import LorafitError

SUPPORTED_SCALING = ("default", "linear", "llama3", "longrope", "yarn", "proportional")


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
    if kind == "proportional":
        return _proportional(head_dim, theta, scaling)
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


def _proportional(head_dim: int, theta: float, s: dict) -> np.ndarray:
    """Gemma 4's partial rotary: the first partial_rotary_factor * head_dim / 2 pairs rotate
    with exponents over the whole head_dim, the other pairs get frequency 0 (left as they
    are); all divided by `factor`."""
    angles = int(float(s.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    exponents = np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32) / head_dim
    rotated = (1.0 / (theta ** exponents.astype(np.float64))).astype(np.float32)
    inv = np.concatenate([rotated, np.zeros(head_dim // 2 - angles, np.float32)])
    return (inv / float(s.get("factor", 1.0))).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Rope:
    """What a layer's rotary embedding needs: the inverse frequencies of its rotated dims,
    the factor that multiplies cos and sin (LongRoPE/YaRN attention scaling) and, for
    LongRoPE, the second set used for a forward whose largest position + 1 exceeds
    `long_after` (transformers picks one set per forward pass)."""
    inv_freq: np.ndarray
    attention_scaling: float = 1.0
    long_inv_freq: np.ndarray | None = None
    long_after: int | None = None


def rope(dim: int, theta: float, scaling: dict | None, max_position_embeddings: int) -> Rope:
    """The rotary embedding of `dim` rotated dims (head_dim * partial_rotary_factor)."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in ("longrope", "su"):
        return _longrope(dim, theta, scaling, max_position_embeddings)
    if kind == "yarn":
        inv_freq, attention_factor = _yarn(dim, theta, scaling, max_position_embeddings)
        return Rope(inv_freq, attention_factor)
    return Rope(inverse_frequencies(dim, theta, scaling))


def _longrope(dim: int, theta: float, s: dict, max_position_embeddings: int) -> Rope:
    """Phi-3's LongRoPE: per-frequency divisors, `short_factor` up to
    `original_max_position_embeddings` tokens and `long_factor` beyond; cos and sin are
    scaled by sqrt(1 + ln(factor) / ln(original)), factor = max / original positions unless
    given (transformers' _compute_longrope_parameters)."""
    original = int(s["original_max_position_embeddings"])
    factor = s.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else \
            math.sqrt(1 + math.log(factor) / math.log(original))
    base = theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)

    def inv(ext):
        ext = np.asarray(ext, dtype=np.float32)
        if ext.shape != base.shape:
            raise LorafitError(f"longrope factors have {ext.size} entries; the rotary "
                               f"dims need {base.size}")
        return (1.0 / (ext * base)).astype(np.float32)
    return Rope(inv(s["short_factor"]), float(attention_factor), inv(s["long_factor"]),
                original)


def _yarn(dim: int, theta: float, s: dict, max_position_embeddings: int):
    """YaRN (transformers' _compute_yarn_parameters): frequencies interpolated by `factor`
    below the band [beta_slow, beta_fast] rotations over the original context, kept above
    it, linearly blended inside; cos and sin scaled by 0.1 * ln(factor) + 1 (or the
    mscale / mscale_all_dim ratio, or `attention_factor` when given).
    Returns (inv_freq float32 (dim/2,), attention_factor)."""
    factor = s.get("factor")
    original = s.get("original_max_position_embeddings") or max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / original
    factor = float(factor)

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = (theta ** (np.arange(0, dim, 2).astype(np.float32) / dim)).astype(np.float32)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # weight of the unscaled (extrapolated) frequency
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq.astype(np.float32), float(attention_factor)
