"""MLX backend: Metal on Apple Silicon, CPU elsewhere.

Ops map onto `mx.fast` kernels (`rms_norm`, `scaled_dot_product_attention`) and MLX's
lazy graph: arrays are evaluated at `synchronize` / `to_float`. On Linux the `mlx[cpu]`
wheel links a reference BLAS that is ~25x slower than OpenBLAS; `lorafit env` says which one
is in use, and the CLI re-executes itself with OpenBLAS preloaded when it is installed.
"""

from __future__ import annotations

import math

import numpy as np
import mlx.core as mx

from lorafit.backends.base import CAUSAL_BLOCKS_FROM, causal_query_blocks
from lorafit.backends.host_memory import keep_freed_memory
from lorafit.core.loss import logit_chunk_elements as chunk_elements

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16,
           "int32": mx.int32, "int64": mx.int64, "bool": mx.bool_}
_NAMES = {v: k for k, v in _DTYPES.items()}


class MLXBackend:
    name = "mlx"

    def __init__(self, device: str | None = None):
        if device in (None, "metal", "gpu"):
            device = "gpu" if mx.metal.is_available() else "cpu"
        if device == "gpu" and not mx.metal.is_available():
            from lorafit.core.errors import LorafitError
            raise LorafitError("MLX sees no Metal device here; use --device cpu")
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        self.device = "metal" if device == "gpu" else "cpu"
        from lorafit.core.launch import detect

        place = detect()
        self._group = None
        self.rank, self.world_size = place.rank, place.world_size
        if self.world_size > 1:
            self._group = _join_group(place)
        self.bf16_native = self.device == "metal"  # Metal has bf16; MLX's CPU emulates it
        if self.device == "cpu":
            keep_freed_memory()  # no page faults for what each step forms again

    # -- arrays ---------------------------------------------------------------------------
    def from_numpy(self, a, dtype=None):
        a = np.asarray(a)
        if a.dtype == np.int64:
            a = a.astype(np.int32)
        x = mx.array(a)
        return x.astype(_DTYPES[dtype]) if dtype is not None else x

    def to_numpy(self, x):
        if x.dtype in (mx.bfloat16, mx.float16):
            x = x.astype(mx.float32)
        return np.array(x)

    def cast(self, x, dtype):
        return x.astype(_DTYPES[dtype])

    def dtype_name(self, x):
        return _NAMES[x.dtype]

    def zeros(self, shape, dtype="float32"):
        return mx.zeros(shape, dtype=_DTYPES[dtype])

    def concat(self, xs, axis):
        return mx.concatenate(xs, axis=axis)

    def swapaxes(self, x, a, b):
        return mx.swapaxes(x, a, b)

    def to_float(self, x):
        return float(x.item())

    def read_safetensors(self, path, dtype, skip=frozenset()):
        """Yield (name, array) one at a time, cast to dtype and evaluated."""
        for name, x in mx.load(str(path)).items():
            if name in skip:
                continue
            if mx.issubdtype(x.dtype, mx.floating):
                x = x.astype(_DTYPES[dtype])
            mx.eval(x)
            yield name, x

    def nbytes(self, x):
        return x.nbytes

    def save_safetensors(self, path, arrays):
        """Write backend arrays (any dtype, bf16 included) to one safetensors file."""
        mx.save_safetensors(str(path), dict(arrays), metadata={"format": "pt"})

    def materialize(self, *trees):
        """Evaluate the lazy graph now, so it does not grow across micro-batches."""
        mx.eval(*trees)

    def inference(self):
        import contextlib
        return contextlib.nullcontext()

    def synchronize(self):
        mx.synchronize()

    # -- layers ---------------------------------------------------------------------------
    def linear(self, x, weight, bias=None):
        if bias is not None:
            return mx.addmm(bias, x, weight.T)
        return x @ weight.T

    def lora_linear(self, x, weight, bias, lora_a, lora_b, scale):
        y = self.linear(x, weight, bias)
        return y + self.linear(self.linear(x, lora_a) * scale, lora_b)

    def lora_linears(self, x, projections, scale):
        return [self.lora_linear(x, *p, scale) for p in projections]

    def embedding(self, ids, table):
        return table[ids]

    def rms_norm(self, x, weight, eps):
        # mx.fast.rms_norm accumulates in float32 and returns x's dtype, like Llama's norm.
        return mx.fast.rms_norm(x, weight.astype(x.dtype), eps)

    def layer_norm(self, x, weight, bias, eps):
        y = mx.fast.layer_norm(x.astype(mx.float32), weight.astype(mx.float32),
                               bias.astype(mx.float32), eps)
        return y.astype(x.dtype)

    def silu(self, x):
        return x * mx.sigmoid(x)

    def gelu_tanh(self, x):
        return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    def softmax(self, x):
        return mx.softmax(x.astype(mx.float32), axis=-1)

    def log_softmax(self, x):
        x = x.astype(mx.float32)
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    def exp(self, x):
        return mx.exp(x)

    def clip(self, x, low, high):
        return mx.clip(x, low, high)

    def top_k_indices(self, x, k):
        return mx.stop_gradient(mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k])

    def take_along_axis(self, x, indices):
        return mx.take_along_axis(x, indices, axis=-1)

    def gather_linear(self, x, weight, indices):
        n, k = indices.shape
        rows = mx.broadcast_to(x, (n, k, x.shape[-1]))[..., None, :]  # (N, K, 1, in)
        return mx.gather_mm(rows, weight.swapaxes(-1, -2), rhs_indices=indices).squeeze(-2)

    def expert_groups(self, indices, experts):
        n, k = indices.shape
        flat = mx.stop_gradient(indices).reshape(-1)
        order = mx.argsort(flat)
        # (token, expert, inverse) of the sorted rows; sizes stay Python ints (mx.compile)
        return order // k, flat[order], mx.argsort(order), n, k

    def group_rows(self, x, groups):
        return x[groups[0]]

    def grouped_linear(self, x, weight, groups, bias=None):
        # gather_mm over rows already in expert order (as mlx-lm's SwitchGLU does)
        out = mx.gather_mm(x[:, None, :], weight.swapaxes(-1, -2), rhs_indices=groups[1],
                           sorted_indices=True).squeeze(-2)
        return out if bias is None else out + bias[groups[1]]

    def ungroup_rows(self, y, groups):
        return y[groups[2]].reshape(groups[3], groups[4], y.shape[-1])
    def write_rows(self, buffer, rows, starts, values):
        n, _, t, _ = values.shape
        pos = starts.reshape(n, 1) + mx.arange(t).reshape(1, t)
        buffer[mx.broadcast_to(rows.reshape(n, 1), (n, t)), :, pos] = \
            values.transpose(0, 2, 1, 3).astype(buffer.dtype)
        return buffer

    def softcap(self, x, cap):
        return mx.tanh(x / cap) * cap
    def sigmoid(self, x):
        return mx.sigmoid(x)

    def log_sigmoid(self, x):
        return -mx.logaddexp(mx.zeros_like(x), -x)

    def log1m_exp(self, x):
        return mx.where(x < -0.6931471805599453, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))

    def relu(self, x):
        return mx.maximum(x, 0)

    def causal_conv1d(self, x, weight, state=None, segment_ids=None):
        B, T, Ch = x.shape
        K = weight.shape[-1]
        if state is None:
            state = mx.zeros((B, K - 1, Ch), dtype=x.dtype)
        xs = mx.concatenate([state.astype(x.dtype), x], axis=1)  # (B, K-1+T, Ch)
        w = weight.astype(x.dtype)
        segs = None
        if segment_ids is not None:
            segs = mx.concatenate([mx.repeat(segment_ids[:, :1], K - 1, axis=1), segment_ids],
                                  axis=1)
        y = 0
        for j in range(K):
            tap = xs[:, j:j + T] * w[:, j]
            if segs is not None:
                tap = tap * (segs[:, j:j + T] == segment_ids)[..., None].astype(x.dtype)
            y = y + tap
        return y, xs[:, T:]

    def gated_delta_rule(self, q, k, v, a, b, a_log, dt_bias, state=None, segment_ids=None):
        B, T, Hk, Dk = q.shape
        Hv, Dv = v.shape[2], v.shape[3]
        out_dtype = v.dtype
        f32 = mx.float32
        beta = mx.sigmoid(b.astype(f32))
        g = -mx.exp(a_log.astype(f32)) * mx.logaddexp(a.astype(f32) + dt_bias.astype(f32), 0.0)
        q, k = (z.astype(f32) * mx.rsqrt((z.astype(f32) ** 2).sum(-1, keepdims=True) + 1e-6)
                for z in (q, k))
        q = q * Dk ** -0.5
        if Hv != Hk:
            q, k = (mx.repeat(z, Hv // Hk, axis=2) for z in (q, k))
        q, k, v = (mx.swapaxes(z, 1, 2) for z in (q, k, v.astype(f32)))  # (B, H, T, D)
        beta, g = mx.swapaxes(beta, 1, 2), mx.swapaxes(g, 1, 2)  # (B, H, T)
        C = min(64, T)
        pad = -T % C
        N = (T + pad) // C
        if pad:  # padded steps have k = v = beta = g = 0: they change nothing
            q, k, v = (mx.pad(z, [(0, 0), (0, 0), (0, pad), (0, 0)]) for z in (q, k, v))
            beta, g = (mx.pad(z, [(0, 0), (0, 0), (0, pad)]) for z in (beta, g))
        q, k, v = (z.reshape(B, Hv, N, C, -1) for z in (q, k, v))
        beta, g = (z.reshape(B, Hv, N, C) for z in (beta, g))
        cum = mx.cumsum(g, axis=-1)
        mask = mx.array(np.tril(np.ones((C, C), dtype=bool)))
        keep = last = None
        if segment_ids is not None:
            seg = segment_ids
            if pad:
                seg = mx.concatenate([seg, mx.repeat(seg[:, -1:], pad, axis=1)], axis=1)
            seg = seg.reshape(B, 1, N, C)
            mask = mask & (seg[..., :, None] == seg[..., None, :])
            prev = mx.concatenate([seg[:, :, :1, :1], seg[:, :, :-1, -1:]], axis=2)
            keep = (seg == prev).astype(f32)  # in the example of the state entering the chunk
            last = (seg == seg[..., -1:]).astype(f32)  # in the example of the last step
        decay = mx.exp(mx.where(mask, cum[..., :, None] - cum[..., None, :], -mx.inf))
        kb = k * beta[..., None]
        kread = kb * mx.exp(cum)[..., None]
        qread = q * mx.exp(cum)[..., None]
        kwrite = k * mx.exp(cum[..., -1:] - cum)[..., None]
        total = mx.exp(cum[..., -1])
        if keep is not None:
            kread, qread = kread * keep[..., None], qread * keep[..., None]
            kwrite, total = kwrite * last[..., None], total * keep[..., -1]
        # (I + L)^-1 for L the strictly lower part, as prod_k (I + (-L)^(2^k)): matmuls
        # only, so it differentiates (MLX has no vjp for triangular solves)
        strict = mx.array(np.tril(np.ones((C, C), dtype=np.float32), -1))
        neg = -((kb @ mx.swapaxes(k, -1, -2)) * decay * strict)
        inv = mx.eye(C, dtype=f32) + neg
        power, span = neg, 2
        while span < C:
            power = power @ power
            inv = inv + inv @ power
            span *= 2
        u = inv @ (v * beta[..., None])
        w = inv @ kread
        attn = (q @ mx.swapaxes(k, -1, -2)) * decay
        S = mx.zeros((B, Hv, Dk, Dv), dtype=f32) if state is None else state.astype(f32)
        outs = []
        for n in range(N):
            vn = u[:, :, n] - w[:, :, n] @ S
            outs.append(qread[:, :, n] @ S + attn[:, :, n] @ vn)
            S = S * total[:, :, n, None, None] + mx.swapaxes(kwrite[:, :, n], -1, -2) @ vn
        o = mx.stack(outs, axis=2).reshape(B, Hv, N * C, Dv)[:, :, :T]
        return mx.swapaxes(o, 1, 2).astype(out_dtype), S

    def row_norms(self, w):
        return mx.sqrt((w.astype(mx.float32) ** 2).sum(axis=1))

    def stop_gradient(self, x):
        return mx.stop_gradient(x)

    def dropout(self, x, p):
        if p <= 0:
            return x
        keep = mx.random.bernoulli(1 - p, x.shape)
        return mx.where(keep, x / (1 - p), mx.zeros_like(x))

    def rope_tables(self, positions, inv_freq, dtype):
        inv = mx.array(inv_freq.astype(np.float32))
        freqs = positions.astype(mx.float32)[..., None] * inv  # (B, T, D/2)
        emb = mx.concatenate([freqs, freqs], axis=-1)[:, None]  # (B, 1, T, D)
        return mx.cos(emb).astype(_DTYPES[dtype]), mx.sin(emb).astype(_DTYPES[dtype])

    def apply_rope(self, x, cos, sin):
        half = x.shape[-1] // 2
        rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention(self, q, k, v, scale, segment_ids=None, window=None, softcap=None,
                  sinks=None, lengths=None):
        T, S = q.shape[2], k.shape[2]
        if softcap is not None or sinks is not None:
            return self._eager_attention(q, k, v, scale, segment_ids, window, softcap, sinks,
                                         lengths)
        blocks = T == S and lengths is None and self.device == "cpu" \
            and T >= CAUSAL_BLOCKS_FROM
        if segment_ids is None and window is None and lengths is None:
            if T == 1:
                return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
            if blocks:
                return _causal_blocks(q, k, v, scale)
            if T == S:
                return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale,
                                                            mask="causal")
        mask = self._mask(T, S, segment_ids, window, lengths)
        if blocks:
            return _causal_blocks(q, k, v, scale, mask)  # packed rows, sliding windows
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    @staticmethod
    def _mask(T, S, segment_ids, window, lengths=None):
        """(T, S) or (B, 1, T, S) boolean: causal, within the window, within the segment;
        with lengths, row b's queries end at its own length (see Backend.attention)."""
        qi = mx.arange(S - T, S)[:, None]
        ki = mx.arange(S)[None, :]
        if lengths is not None:
            qi = lengths.reshape(-1, 1, 1, 1) - T + mx.arange(T).reshape(1, 1, T, 1)
        mask = ki <= qi
        if window is not None:
            mask = mx.logical_and(mask, (qi - ki) < window)
        if segment_ids is not None:
            same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
            mask = mx.logical_and(mask, same)
        return mask

    def _eager_attention(self, q, k, v, scale, segment_ids, window, softcap, sinks,
                         lengths=None):
        """Scores formed explicitly, for what fused kernels cannot do (soft-capping, sinks)."""
        B, Hq, T, D = q.shape
        Hk, S = k.shape[1], k.shape[2]
        qg = q.reshape(B, Hk, Hq // Hk, T, D)  # query heads grouped by their kv head
        scores = (qg @ mx.swapaxes(k[:, :, None], -1, -2)).astype(mx.float32) * scale
        if softcap is not None:
            scores = mx.tanh(scores / softcap) * softcap
        mask = self._mask(T, S, segment_ids, window, lengths)
        mask = mask[:, :, None] if mask.ndim == 4 else mask
        scores = mx.where(mask, scores, mx.array(-mx.inf, dtype=mx.float32))
        if sinks is not None:
            sink = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, Hk, Hq // Hk, 1, 1),
                                   (B, Hk, Hq // Hk, T, 1))
            scores = mx.concatenate([scores, sink], axis=-1)
        probs = mx.softmax(scores, axis=-1, precise=True)
        if sinks is not None:
            probs = probs[..., :-1]
        out = probs.astype(v.dtype) @ v[:, :, None]  # (B, Hk, G, T, D)
        return out.reshape(B, Hq, T, D)

    def cross_entropy(self, logits, targets, mask):
        logits = logits.astype(mx.float32)
        lse = mx.logsumexp(logits, axis=-1)
        picked = mx.take_along_axis(logits, targets[:, None].astype(mx.int32), axis=-1)[:, 0]
        mask = mask.astype(mx.float32)
        return ((lse - picked) * mask).sum(), mask.sum()

    def linear_cross_entropy(self, h, weight, targets, mask, chunk_rows, softcap=None,
                             per_token=False):
        mask = mask.astype(mx.float32)
        targets = targets.astype(mx.int32)

        @mx.custom_function
        def fused(h_):
            # Each chunk yields one (rows, C + 1) block: dL/dh and the rows' losses. The next
            # chunk's rows wait on that block (mx.depends), so the lazy graph runs the chunks
            # one after another and frees each chunk's logits before the next forms its own;
            # without the chain they sit at the same tape depth and are all alive at once.
            blocks = []
            for start in range(0, h_.shape[0], chunk_rows):
                hs, t, m = (z[start:start + chunk_rows] for z in (h_, targets, mask))
                if blocks:
                    hs = mx.depends(hs, blocks[-1])
                logits = (hs @ weight.T).astype(mx.float32)
                if softcap is not None:
                    logits = mx.tanh(logits / softcap) * softcap
                picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
                row = m[:, None]
                slope = None
                if softcap is not None:  # times dc/dz = 1 - (c / cap)^2, picked column too
                    slope = 1 - (logits / softcap) ** 2
                    row = row * mx.take_along_axis(slope, t[:, None], axis=-1)
                if weight.dtype == mx.float32:
                    # one exp over the chunk for both the loss and the softmax (MLX's CPU
                    # exp is the head's largest cost after its two matmuls), and the
                    # normalisation and mask scale the (rows, C) product, not (rows, V):
                    # (softmax - onehot) @ W  ==  (e @ W) / total - W[targets]
                    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
                    e = mx.exp(logits - top)
                    total = e.sum(axis=-1, keepdims=True)
                    lse = (top + mx.log(total))[:, 0]
                    if slope is not None:
                        e = e * slope
                    spread = (e @ weight) * (m[:, None] / total)
                else:  # exp, mask and the cast to the weights' dtype fuse into one kernel
                    lse = mx.logsumexp(logits, axis=-1)
                    probs = mx.exp(logits - lse[:, None]) * m[:, None]
                    if slope is not None:
                        probs = probs * slope
                    spread = probs.astype(weight.dtype) @ weight
                # no (rows, V) one-hot: softmax @ W - W[targets]
                grad = (spread - weight[t] * row.astype(weight.dtype)).astype(mx.float32)
                blocks.append(mx.concatenate([grad, ((lse - picked) * m)[:, None]], axis=1))
            every = mx.concatenate(blocks, axis=0)
            losses = every[:, -1]
            return losses if per_token else losses.sum(), every[:, :-1].astype(h_.dtype)

        @fused.vjp
        def fused_vjp(primals, cotangents, outputs):
            cot = cotangents[0].astype(outputs[1].dtype)
            return outputs[1] * (cot[:, None] if per_token else cot)

        return fused(h)[0], mask.sum()

    logit_chunk_elements = chunk_elements("mlx")  # core/loss.py

    quantization = (4, 8)
    quantized_format = "affine"

    def quantization_hint(self, bits):
        return "choose 4bit or 8bit"

    def quantize(self, w, bits, group_size):
        return mx.quantize(w, group_size=group_size, bits=bits)

    def quantized_linear(self, x, w, scales, biases, bits, group_size):
        return mx.quantized_matmul(x, w, scales, biases, transpose=True,
                                   group_size=group_size, bits=bits)

    def dequantize(self, w, scales, biases, bits, group_size):
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)

    # -- training -------------------------------------------------------------------------
    def value_and_grad(self, fn):
        vg = mx.value_and_grad(lambda trainable, *args: _pack(fn(trainable, *args)))

        def wrapped(trainable, *args):
            (loss, aux), grads = vg(trainable, *args)
            return (loss, aux), grads
        return wrapped

    pad_multiple = 32  # compiled graphs are reused across batches padded to this

    def compile(self, fn):
        return mx.compile(fn)

    def compile_forward(self, fn):
        """fn itself: the step around it is mx.compiled (compile)."""
        return fn

    def compiled_layer(self, kind, fn):
        """fn itself: the whole step is one mx.compiled graph already."""
        return fn

    def checkpoint(self, fn):
        """Layer after layer in the backward, as torch's checkpoint (backends/mlx/recompute:
        mx.checkpoint lets the tape place each re-run anywhere after the forward)."""
        from lorafit.backends.mlx.recompute import layer_checkpoint
        return layer_checkpoint(fn)

    def make_optimizer(self, params, shard=False, **hyper):
        if shard:
            from lorafit.core.errors import LorafitError
            from lorafit.core.estimate import SHARD_ON_MLX
            raise LorafitError(SHARD_ON_MLX)
        from lorafit.backends.mlx.optim import MLXAdamW
        return MLXAdamW(params, **hyper)

    def global_norm(self, grads):
        return mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for g in grads.values()))

    def memory_stats(self):
        return {"peak": mx.get_peak_memory(), "current": mx.get_active_memory(),
                "source": "mlx allocator"}

    def measure_peak(self, fn):
        """(fn(), peak bytes of MLX arrays while it ran, weights included)."""
        mx.synchronize()
        mx.reset_peak_memory()
        out = fn()
        mx.synchronize()
        return out, mx.get_peak_memory()

    def reset_peak_memory(self):
        mx.reset_peak_memory()

    # -- several processes ----------------------------------------------------------------
    def all_reduce(self, arrays):
        if self.world_size == 1:
            return arrays
        keys = list(arrays)
        flat = mx.concatenate([arrays[k].reshape(-1).astype(mx.float32) for k in keys])
        total = _collective(lambda: mx.distributed.all_sum(flat, group=self._group,
                                                           stream=mx.cpu))
        out, at = {}, 0
        for k in keys:
            n = arrays[k].size
            out[k] = total[at:at + n].reshape(arrays[k].shape).astype(arrays[k].dtype)
            at += n
        return out

    def broadcast(self, arrays):
        if self.world_size == 1:
            return arrays
        mine = {k: v if self.rank == 0 else mx.zeros_like(v) for k, v in arrays.items()}
        return self.all_reduce(mine)  # exact: every other process adds zeros

    def barrier(self):
        if self.world_size > 1:
            _collective(lambda: mx.distributed.all_sum(mx.array(0.0), group=self._group,
                                                       stream=mx.cpu))

    def shard_frozen(self, params):
        if self.world_size == 1:
            return params
        from lorafit.core.errors import LorafitError
        from lorafit.core.estimate import SHARD_ON_MLX
        raise LorafitError(SHARD_ON_MLX)

    def read_layer_slice(self, sources, dtype):
        from lorafit.core.errors import LorafitError
        from lorafit.core.estimate import SHARD_ON_MLX
        raise LorafitError(SHARD_ON_MLX)

    def gather_frozen(self, layer):
        """Nothing is sharded on MLX."""
        return layer

    def launch_command(self, nproc, args):
        import sys
        # mlx.launch's entry point, run by this interpreter (the script may not be on PATH)
        launcher = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch "
                    "import main; sys.exit(main())"]
        return [*launcher, "--backend", "ring", "-n", str(nproc), "--starting-port", str(_free_ports(nproc)),
                "--python", sys.executable, "--", "-m", "lorafit.cli", *args]

    def seed(self, seed):
        mx.random.seed(seed)


def _causal_blocks(q, k, v, scale, mask=None):
    """MLX's CPU runs scaled_dot_product_attention unfused: scores, mask, softmax over the
    whole (T, S) square, the masked half included, and the same in the backward; from
    CAUSAL_BLOCKS_FROM on, attention runs here instead, skipping the keys past each block.
    Causal attention of (B, H, T, D) q, k, v in query blocks of max(128, T / 8) rows,
    block i over keys [0, end_i) with mx.fast's causal mask (aligned to the last key), or
    with its rows and columns of a boolean (T, T) / (B, 1, T, T) mask that is causal too
    (segments, windows). The keys it skips had probability exactly 0, so each row's
    softmax and output are the full square's up to rounding; a block's scores,
    probabilities and their gradients are (rows, end_i) instead of (rows, T). At T = 512
    (4 blocks: 5/8 of the square) one layer's forward + backward took 0.76x the CPU time
    of the single call."""
    outs = [mx.fast.scaled_dot_product_attention(
        q[:, :, s:e], k[:, :, :e], v[:, :, :e], scale=scale,
        mask="causal" if mask is None else mask[..., s:e, :e])
        for s, e in causal_query_blocks(q.shape[2])]
    return mx.concatenate(outs, axis=2)


def _pack(out):
    """mx.value_and_grad differentiates the first output; keep aux alongside."""
    loss, aux = out
    return loss, aux


def _join_group(place):
    """mlx.launch's environment -> mx.distributed's group (ring, MPI, ...)."""
    group = mx.distributed.init(strict=True)
    if group.size() != place.world_size or group.rank() != place.rank:
        from lorafit.core.errors import LorafitError
        raise LorafitError(f"mx.distributed says rank {group.rank()} of {group.size()}, "
                           f"the launcher's environment rank {place.rank} of "
                           f"{place.world_size}")
    return group


def _collective(fn):
    """Run a collective now; a peer that is gone becomes one line."""
    try:
        out = fn()
        mx.eval(out)
        return out
    except RuntimeError as e:
        from lorafit.core.errors import LorafitError
        text = " ".join(str(e).split())[:200]
        raise LorafitError(f"lost contact with another training process (it stopped or "
                           f"died): {text}") from None


def _free_ports(n: int) -> int:
    """The first of n consecutive free TCP ports on the loopback (the ring's listeners)."""
    import random
    import socket

    for _ in range(100):
        start = random.randint(20000, 60000 - n)
        socks = []
        try:
            for p in range(start, start + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    return 32323
