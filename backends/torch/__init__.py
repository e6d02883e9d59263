"""PyTorch backend: CUDA, MPS and CPU.

Ops map onto PyTorch's fused kernels: `F.scaled_dot_product_attention` (flash / memory-
efficient kernels on CUDA, GQA through `enable_gqa`), `F.rms_norm`, `F.cross_entropy`, and
`torch.optim.AdamW` (fused on CUDA, foreach elsewhere). On CPU, bf16 matmuls are emulated
on most x86 parts and are far slower than fp32; train in fp32 there.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from lorafit.backends.base import torch_cpu_blocks
from lorafit.backends.host_memory import keep_freed_memory
from lorafit.backends.segments import segment_layout
from lorafit.backends.torch.causal_blocks import CausalBlocks
from lorafit.backends.torch.memory import TensorTracker
from lorafit.backends.torch.sharded_base import ShardedLayer, gather_layer
from lorafit.core.loss import logit_chunk_elements as chunk_elements

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


class TorchBackend:
    name = "torch"

    def __init__(self, device: str = "cpu"):
        if device == "cuda" and not torch.cuda.is_available():
            from lorafit.core.errors import LorafitError
            raise LorafitError("--device cuda asked for, but PyTorch sees no CUDA device")
        from lorafit.core.launch import detect

        place = detect()
        self.rank, self.world_size = place.rank, place.world_size
        if device == "cuda" and self.world_size > 1:
            torch.cuda.set_device(place.local_rank)
            self._device = torch.device("cuda", place.local_rank)
        else:
            self._device = torch.device(device)
        self.device = device
        self.bf16_native = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        self._tracker = TensorTracker() if device == "cpu" else None
        if device == "cpu":
            keep_freed_memory()  # no page faults for what each step forms again
        self._layer_compiler = None  # set while a compile_forward function runs
        if self.world_size > 1:
            _join_process_group(device)

    # -- arrays ---------------------------------------------------------------------------
    def from_numpy(self, a, dtype=None):
        t = torch.from_numpy(np.array(a, copy=True))  # never alias the caller's array
        if dtype is not None:
            t = t.to(_DTYPES[dtype])
        return t.to(self._device)

    def to_numpy(self, x):
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.cpu().numpy()

    def cast(self, x, dtype):
        return x.to(_DTYPES[dtype])

    def dtype_name(self, x):
        return _NAMES[x.dtype]

    def zeros(self, shape, dtype="float32"):
        return torch.zeros(shape, dtype=_DTYPES[dtype], device=self._device)

    def concat(self, xs, axis):
        return torch.cat(xs, dim=axis)

    def swapaxes(self, x, a, b):
        return x.transpose(a, b)

    def to_float(self, x):
        return float(x.detach())

    def read_safetensors(self, path, dtype, skip=frozenset()):
        """Yield (name, tensor) one at a time, cast to dtype on the device."""
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in skip:
                    continue
                t = f.get_tensor(name)
                if t.is_floating_point():
                    t = t.to(_DTYPES[dtype])
                yield name, t.to(self._device)

    def nbytes(self, x):
        if isinstance(x, ShardedLayer):  # --shard: this process's slices of a layer
            return x.nbytes
        if not hasattr(x, "numel"):  # a bitsandbytes QuantState: absmax and its own scales
            return sum(self.nbytes(t) for t in (x.absmax, getattr(x.state2, "absmax", None))
                       if t is not None)
        return x.numel() * x.element_size()

    def save_safetensors(self, path, arrays):
        """Write backend arrays (any dtype, bf16 included) to one safetensors file."""
        from safetensors.torch import save_file
        save_file({k: v.detach().contiguous().cpu() for k, v in arrays.items()}, str(path),
                  metadata={"format": "pt"})

    def materialize(self, *trees):
        """Nothing to do: PyTorch runs eagerly."""
        return None

    def inference(self):
        return torch.no_grad()

    def synchronize(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    # -- layers ---------------------------------------------------------------------------
    def linear(self, x, weight, bias=None):
        return F.linear(x, weight, bias)

    def lora_linear(self, x, weight, bias, lora_a, lora_b, scale):
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            y = F.linear(x, weight, bias)  # a trained base: autograd's own path
            return y + F.linear(F.linear(x, lora_a) * scale, lora_b)
        return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, scale)

    def lora_linears(self, x, projections, scale):
        if any(w.requires_grad or (b is not None and b.requires_grad)
               for w, b, _, _ in projections):
            return [self.lora_linear(x, *p, scale) for p in projections]
        return list(_LoraLinears.apply(x, scale, *(t for p in projections for t in p)))

    def embedding(self, ids, table):
        return F.embedding(ids, table)

    def rms_norm(self, x, weight, eps):
        dtype = x.dtype
        if dtype == torch.float32 and weight.dtype == torch.float32:
            if not weight.requires_grad and x.device.type == "cpu":
                return _RmsNorm.apply(x, weight, eps)  # fewer passes, forward and backward
            # one kernel with the weight folded in: the same products, one pass fewer
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
        return weight * y.to(dtype)

    def layer_norm(self, x, weight, bias, eps):
        y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
        return y.to(x.dtype)

    def silu(self, x):
        return F.silu(x)

    def gelu_tanh(self, x):
        return F.gelu(x, approximate="tanh")

    def softmax(self, x):
        return torch.softmax(x.float(), dim=-1)

    def log_softmax(self, x):
        return torch.log_softmax(x.float(), dim=-1)

    def exp(self, x):
        return torch.exp(x)

    def clip(self, x, low, high):
        return torch.clamp(x, low, high)

    def top_k_indices(self, x, k):
        return torch.topk(x, k, dim=-1).indices

    def take_along_axis(self, x, indices):
        return torch.gather(x, -1, indices)

    def gather_linear(self, x, weight, indices):
        # Rows sorted by expert, one matmul per expert, then put back in order (each
        # expert's weight gradient is then one matmul over its rows).
        n, k = indices.shape
        rows = x.expand(n, k, x.shape[-1]).reshape(n * k, x.shape[-1])
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=weight.shape[0]).tolist()
        parts = torch.split(rows[order], counts)
        out = torch.cat([F.linear(p, weight[e]) for e, p in enumerate(parts) if len(p)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return out[inverse].reshape(n, k, weight.shape[1])

    def expert_groups(self, indices, experts):
        n, k = indices.shape
        flat = indices.reshape(-1)
        expert, order = torch.sort(flat, stable=True)
        counts = torch.bincount(flat, minlength=experts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return _ExpertGroups(order, inverse, order // k, expert,
                             torch.cumsum(counts, 0, dtype=torch.int32), counts.tolist(), n, k)

    def group_rows(self, x, groups):
        return x.index_select(0, groups.token)

    def grouped_linear(self, x, weight, groups, bias=None):
        if _grouped_mm_fits(x, weight):  # one kernel for all experts, forward and backward
            out = F.grouped_mm(x.contiguous(), _grouped_mm_operand(weight.transpose(-2, -1)),
                               offs=groups.offsets)
        else:
            parts = torch.split(x, groups.counts)
            out = torch.cat([F.linear(p, weight[e]) for e, p in enumerate(parts) if len(p)])
        return out if bias is None else out + bias.index_select(0, groups.expert)

    def ungroup_rows(self, y, groups):
        # the inverse permutation, whose gradient is the forward one (no scatter)
        y = _Gather.apply(y, groups.inverse, groups.order, False)
        return y.reshape(groups.n, groups.k, y.shape[-1])
    def write_rows(self, buffer, rows, starts, values):
        n, _, t, _ = values.shape
        pos = starts.reshape(n, 1) + torch.arange(t, device=starts.device).reshape(1, t)
        # a copy: values may be a slice of buffer itself (moving a row)
        buffer[rows.reshape(n, 1).expand(n, t), :, pos] = values.permute(0, 2, 1, 3).to(
            buffer.dtype, copy=True)
        return buffer

    def softcap(self, x, cap):
        return torch.tanh(x / cap) * cap
    def sigmoid(self, x):
        return torch.sigmoid(x)

    def log_sigmoid(self, x):
        return torch.nn.functional.logsigmoid(x)

    def log1m_exp(self, x):
        return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                           torch.log(-torch.expm1(x)))

    def relu(self, x):
        return torch.relu(x)

    def causal_conv1d(self, x, weight, state=None, segment_ids=None):
        B, T, Ch = x.shape
        K = weight.shape[-1]
        if state is None:
            state = x.new_zeros(B, K - 1, Ch)
        xs = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K-1+T, Ch)
        w = weight.to(x.dtype)
        if segment_ids is None:
            y = F.conv1d(xs.transpose(1, 2), w[:, None, :], groups=Ch).transpose(1, 2)
        else:  # tap by tap, each masked to the query's own example
            segs = torch.cat([segment_ids[:, :1].expand(B, K - 1), segment_ids], dim=1)
            y = 0
            for j in range(K):
                same = (segs[:, j:j + T] == segment_ids).unsqueeze(-1).to(x.dtype)
                y = y + xs[:, j:j + T] * w[:, j] * same
        return y, xs[:, T:]

    def gated_delta_rule(self, q, k, v, a, b, a_log, dt_bias, state=None, segment_ids=None):
        B, T, Hk, Dk = q.shape
        Hv, Dv = v.shape[2], v.shape[3]
        out_dtype = v.dtype
        beta = torch.sigmoid(b.float())
        g = -torch.exp(a_log.float()) * F.softplus(a.float() + dt_bias.float())
        q, k = (z.float() * torch.rsqrt((z.float() ** 2).sum(-1, keepdim=True) + 1e-6)
                for z in (q, k))
        q = q * Dk ** -0.5
        if Hv != Hk:
            q, k = (z.repeat_interleave(Hv // Hk, dim=2) for z in (q, k))
        q, k, v = (z.transpose(1, 2) for z in (q, k, v.float()))  # (B, H, T, D)
        beta, g = beta.transpose(1, 2), g.transpose(1, 2)  # (B, H, T)
        C = min(64, T)
        pad = -T % C
        N = (T + pad) // C
        if pad:  # padded steps have k = v = beta = g = 0: they change nothing
            q, k, v = (F.pad(z, (0, 0, 0, pad)) for z in (q, k, v))
            beta, g = (F.pad(z, (0, pad)) for z in (beta, g))
        q, k, v = (z.reshape(B, Hv, N, C, -1) for z in (q, k, v))
        beta, g = (z.reshape(B, Hv, N, C) for z in (beta, g))
        cum = g.cumsum(-1)
        mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        keep = last = None
        if segment_ids is not None:
            seg = segment_ids
            if pad:
                seg = torch.cat([seg, seg[:, -1:].expand(B, pad)], dim=1)
            seg = seg.reshape(B, 1, N, C)
            mask = mask & (seg[..., :, None] == seg[..., None, :])
            prev = torch.cat([seg[:, :, :1, :1], seg[:, :, :-1, -1:]], dim=2)
            keep = (seg == prev).float()  # in the example of the state entering the chunk
            last = (seg == seg[..., -1:]).float()  # in the example of the chunk's last step
        decay = torch.where(mask, cum[..., :, None] - cum[..., None, :],
                            float("-inf")).exp()  # (B, H, N, C, C)
        kb = k * beta[..., None]
        kread = kb * cum.exp()[..., None]
        qread = q * cum.exp()[..., None]
        kwrite = k * (cum[..., -1:] - cum).exp()[..., None]
        total = cum[..., -1].exp()
        if keep is not None:
            kread, qread = kread * keep[..., None], qread * keep[..., None]
            kwrite, total = kwrite * last[..., None], total * keep[..., -1]
        ut = (kb @ k.transpose(-1, -2)) * decay  # only its strictly lower part is read
        sol = torch.linalg.solve_triangular(ut, torch.cat([v * beta[..., None], kread], -1),
                                            upper=False, unitriangular=True)
        u, w = sol[..., :Dv], sol[..., Dv:]
        attn = (q @ k.transpose(-1, -2)) * decay
        S = (torch.zeros(B, Hv, Dk, Dv, device=q.device) if state is None
             else state.float())
        outs = []
        for n in range(N):
            vn = u[:, :, n] - w[:, :, n] @ S
            outs.append(qread[:, :, n] @ S + attn[:, :, n] @ vn)
            S = S * total[:, :, n, None, None] + kwrite[:, :, n].transpose(-1, -2) @ vn
        o = torch.stack(outs, dim=2).reshape(B, Hv, N * C, Dv)[:, :, :T]
        return o.transpose(1, 2).to(out_dtype), S

    def row_norms(self, w):
        return torch.linalg.vector_norm(w.float(), dim=1)

    def stop_gradient(self, x):
        return x.detach()

    def dropout(self, x, p):
        return F.dropout(x, p) if p > 0 else x

    def rope_tables(self, positions, inv_freq, dtype):
        inv = torch.from_numpy(inv_freq.astype(np.float32)).to(self._device)
        freqs = positions.float()[..., None] * inv  # (B, T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos().to(_DTYPES[dtype]), emb.sin().to(_DTYPES[dtype])

    def apply_rope(self, x, cos, sin):
        if not (cos.requires_grad or sin.requires_grad) and x.shape[-1] % 2 == 0:
            return _Rope.apply(x, cos, sin)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def attention(self, q, k, v, scale, segment_ids=None, window=None, softcap=None,
                  sinks=None, lengths=None, blocks=True):
        """Backend.attention; `blocks=False` keeps causal rows off CausalBlocks (packed
        examples: their lengths are known only once batched, so the estimator cannot count
        the probabilities those blocks keep)."""
        T, S = q.shape[2], k.shape[2]
        gqa = q.shape[1] != k.shape[1]
        if segment_ids is not None and lengths is None and T == S:
            return self._segment_attention(q, k, v, scale, segment_ids, window, softcap,
                                           sinks)
        if softcap is not None or sinks is not None:
            return self._eager_attention(q, k, v, scale, segment_ids, window, softcap, sinks,
                                         lengths)
        if segment_ids is None and window is None and lengths is None:
            if T == S and blocks and _causal_blocks_pay(q, k, v):
                return _causal_blocks(q, k, v, scale)
            if T == S:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                      enable_gqa=gqa)
            if T == 1:
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        mask = self._mask(T, S, segment_ids, window, q.device, lengths)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=gqa)

    @torch.compiler.disable  # its layout is read on the host (--compile: eager here)
    def _segment_attention(self, q, k, v, scale, segment_ids, window, softcap, sinks):
        """Packed rows without a (B, T, T) mask: each packed example is gathered into a
        row of its own, examples of about the same length into one batch, and attention
        runs over those as plain causal attention (the fused kernels' is_causal path).
        A batch is as long as its longest example rounded up to a bucket
        (segments.bucket_length); the shorter ones are padded at their end, where causality
        hides the padding from every real query, and the padded outputs are dropped."""
        B, Hq, T, D = q.shape
        shapes, index, order, unpad = self._segment_layout(segment_ids)
        # one gather per tensor: (examples' tokens padded to their buckets, heads, D)
        q, k, v = (_Gather.apply(z.transpose(1, 2).reshape(B * T, z.shape[1], D), index,
                                 order, False) for z in (q, k, v))
        sizes = [n * L for n, L in shapes]  # split, not sliced: one backward for all
        outs = []
        for (n, L), qg, kg, vg in zip(shapes, *(z.split(sizes) for z in (q, k, v))):
            qg, kg, vg = (z.view(n, L, -1, D).transpose(1, 2) for z in (qg, kg, vg))
            o = self.attention(qg, kg, vg, scale, None, window, softcap, sinks, blocks=False)
            outs.append(o.transpose(1, 2).reshape(n * L, Hq, D))
        # back in (B * T) order, padding dropped; the padding's gradient is zero
        out = _Gather.apply(torch.cat(outs), order, unpad, True)
        return out.view(B, T, Hq, D).transpose(1, 2)

    def _segment_layout(self, segment_ids):
        """((n, L) per length bucket, their gather indices, the inverse order) of a batch's
        segments (backends/segments.py);
        computed once per segment_ids tensor (every layer of a step passes the same one)."""
        cached = getattr(self, "_layout_cache", None)
        if cached is not None and cached[0]() is segment_ids:
            return cached[1]
        import weakref

        groups, order = segment_layout(segment_ids.cpu().numpy())
        index = np.concatenate([g.reshape(-1) for g in groups])
        unpad = np.full(len(index), len(order))  # padded slot -> the zero row past the end
        unpad[order] = np.arange(len(order))
        layout = ([g.shape for g in groups], *(torch.from_numpy(a).to(self._device)
                                               for a in (index, order, unpad)))
        self._layout_cache = (weakref.ref(segment_ids), layout)
        return layout

    @staticmethod
    def _mask(T, S, segment_ids, window, device, lengths=None):
        """(T, S) or (B, 1, T, S) boolean: causal, within the window, within the segment;
        with lengths, row b's queries end at its own length (see Backend.attention)."""
        qi = torch.arange(S - T, S, device=device)[:, None]
        ki = torch.arange(S, device=device)[None, :]
        if lengths is not None:
            qi = (lengths.reshape(-1, 1, 1, 1) - T
                  + torch.arange(T, device=device).reshape(1, 1, T, 1))
        mask = ki <= qi
        if window is not None:
            mask = mask & (qi - ki < window)
        if segment_ids is not None:
            same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
            mask = mask & same
        return mask

    def _eager_attention(self, q, k, v, scale, segment_ids, window, softcap, sinks,
                         lengths=None):
        """Scores formed explicitly, for what fused kernels cannot do (soft-capping, sinks)."""
        B, Hq, T, D = q.shape
        Hk, S = k.shape[1], k.shape[2]
        qg = q.reshape(B, Hk, Hq // Hk, T, D)  # query heads grouped by their kv head
        scores = (qg @ k[:, :, None].transpose(-1, -2)).float() * scale  # (B, Hk, G, T, S)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        mask = self._mask(T, S, segment_ids, window, q.device, lengths)
        mask = mask[:, :, None] if mask.dim() == 4 else mask
        scores = scores.masked_fill(~mask, float("-inf"))
        if sinks is not None:
            sink = sinks.float().reshape(1, Hk, Hq // Hk, 1, 1).expand(B, -1, -1, T, 1)
            scores = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(scores, dim=-1)
        if sinks is not None:
            probs = probs[..., :-1]
        out = probs.to(v.dtype) @ v[:, :, None]  # (B, Hk, G, T, D)
        return out.reshape(B, Hq, T, D)

    def cross_entropy(self, logits, targets, mask):
        losses = F.cross_entropy(logits.float(), targets.long(), reduction="none")
        mask = mask.to(losses.dtype)
        return (losses * mask).sum(), mask.sum()

    def linear_cross_entropy(self, h, weight, targets, mask, chunk_rows, softcap=None,
                             per_token=False):
        mask = mask.to(torch.float32)
        return (_LinearCrossEntropy.apply(h, weight, targets.long(), mask, chunk_rows, softcap,
                                          per_token), mask.sum())

    logit_chunk_elements = chunk_elements("torch")  # core/loss.py

    @property
    def quantization(self):
        """4-bit NF4 with double-quantized scales (QLoRA) through bitsandbytes, if installed."""
        try:
            importlib.import_module("bitsandbytes")
        except ImportError:
            return ()
        return (4,)

    quantized_format = "nf4"

    def quantization_hint(self, bits):
        if bits == 4:
            return "pip install bitsandbytes for 4bit, or use --backend mlx (4bit, 8bit)"
        return "use --backend mlx (4bit, 8bit)"

    def quantize(self, w, bits, group_size):
        """NF4, block size `group_size`, absmax scales quantized again (QLoRA's double
        quantization). Returns (packed uint8, bitsandbytes QuantState, None)."""
        import bitsandbytes.functional as bnbF
        q, state = bnbF.quantize_4bit(w.contiguous(), blocksize=group_size, quant_type="nf4",
                                      compress_statistics=True)
        return q, state, None

    def quantized_linear(self, x, w, scales, biases, bits, group_size):
        import bitsandbytes as bnb
        return bnb.matmul_4bit(x, w.t(), quant_state=scales)

    def dequantize(self, w, scales, biases, bits, group_size):
        import bitsandbytes.functional as bnbF
        return bnbF.dequantize_4bit(w, scales)

    # -- training -------------------------------------------------------------------------
    def value_and_grad(self, fn):
        def wrapped(trainable, *args):
            leaves = {k: v.detach().requires_grad_(True) for k, v in trainable.items()}
            loss, aux = fn(leaves, *args)
            grads = torch.autograd.grad(loss, list(leaves.values()))
            return (loss.detach(), aux), dict(zip(leaves.keys(), grads))
        return wrapped

    pad_multiple = 1

    def compile(self, fn):
        """Eager: torch.compile's start-up cost outweighs its gain on short CPU runs."""
        return fn

    def compile_forward(self, fn):
        """fn with its decoder layers compiled (torch.compile, inductor) while it runs: each
        layer kind is traced once and reused by every layer of that kind (compiled_layer,
        backends/torch/compiled.py). The CPU needs a C++ compiler for inductor's kernels."""
        from lorafit.backends.torch.compiled import LayerCompiler

        compiler = LayerCompiler(self.device)

        def run(*args):
            outer, self._layer_compiler = self._layer_compiler, compiler
            try:
                return fn(*args)
            finally:
                self._layer_compiler = outer
        return run

    def compiled_layer(self, kind, fn):
        if self._layer_compiler is None:
            return fn
        return self._layer_compiler.layer(kind, fn)

    def checkpoint(self, fn):
        def wrapped(*args):
            return torch_checkpoint(fn, *args, use_reentrant=False)
        return wrapped

    def make_optimizer(self, params, shard=False, **hyper):
        if shard and self.world_size > 1:  # FSDP2 shards the state (backends/torch/sharded)
            from lorafit.backends.torch.sharded import ShardedAdamW
            return ShardedAdamW(params, **hyper)
        from lorafit.backends.torch.optim import TorchAdamW
        return TorchAdamW(params, **hyper)

    def global_norm(self, grads):
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()]))

    def memory_stats(self):
        if self.device == "cuda":
            return {"peak": torch.cuda.max_memory_allocated(),
                    "current": torch.cuda.memory_allocated(),
                    "reserved_peak": torch.cuda.max_memory_reserved(),
                    "source": "torch.cuda allocator"}
        if self.device == "mps":
            cur = torch.mps.current_allocated_memory()
            return {"peak": cur, "current": cur, "source": "torch.mps (current only)"}
        return self._tracker.stats()

    def measure_peak(self, fn):
        """(fn(), peak bytes of device arrays while it ran). On the CPU this is the tensor-
        level peak from PyTorch's memory profiler; on CUDA the allocator's counter."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            return out, torch.cuda.max_memory_allocated()
        from lorafit.backends.torch.memory import profiled_peak
        return profiled_peak(fn)

    def reset_peak_memory(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif self._tracker is not None:
            self._tracker.reset_peak()

    # -- several processes ----------------------------------------------------------------
    def all_reduce(self, arrays):
        if self.world_size == 1:
            return arrays
        keys = list(arrays)
        flat = torch.cat([arrays[k].detach().reshape(-1).float() for k in keys])
        _collective(dist.all_reduce, flat)
        out, at = {}, 0
        for k in keys:
            n = arrays[k].numel()
            out[k] = flat[at:at + n].view(arrays[k].shape).to(arrays[k].dtype)
            at += n
        return out

    def broadcast(self, arrays):
        if self.world_size == 1:
            return arrays
        out = {}
        for k, v in arrays.items():
            t = v.detach().clone()
            _collective(dist.broadcast, t, 0)
            out[k] = t.requires_grad_(v.requires_grad)
        return out

    def barrier(self):
        if self.world_size > 1:
            _collective(dist.barrier)

    def shard_frozen(self, params):
        if self.world_size == 1:
            return params
        from lorafit.backends.torch.sharded_base import shard_layers
        return shard_layers(params, self.rank, self.world_size)

    def read_layer_slice(self, sources, dtype):
        return ShardedLayer.read(sources, _DTYPES[dtype], self.rank, self.world_size,
                                 self._device)

    def gather_frozen(self, layer):
        return gather_layer(layer)

    def launch_command(self, nproc, args):
        import sys
        # torchrun itself, without the traceback its main prints when a worker fails: the
        # caller names the failed rank in one line (core/launch.py)
        torchrun = ("import sys\n"
                    "from torch.distributed.run import parse_args, run\n"
                    "from torch.distributed.elastic.multiprocessing.errors import "
                    "ChildFailedError\n"
                    "try:\n    run(parse_args(sys.argv[1:]))\n"
                    "except ChildFailedError:\n    sys.exit(1)\n")
        return [sys.executable, "-c", torchrun, "--standalone",
                "--nproc-per-node", str(nproc), "--monitor-interval", "0.5",
                "-m", "lorafit.cli", *args]

    def seed(self, seed):
        torch.manual_seed(seed)


@torch.compiler.disable  # a Python loop over blocks: eager between a compiled layer's parts
def _causal_blocks(q, k, v, scale):
    return CausalBlocks.apply(q, k, v, scale)


def _causal_blocks_pay(q, k, v) -> bool:
    """Plain causal attention in float32 training on the CPU, at the lengths where query
    blocks of GEMMs beat the flash kernel (backends/base torch_cpu_blocks); not where no
    gradient is asked for (the flash kernel keeps no probabilities then)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)
            and torch_cpu_blocks(q.shape[2]))


class _ExpertGroups(NamedTuple):
    """ops.expert_groups: order sorts the flat (N*K) choices by expert, inverse undoes it;
    token and expert are each sorted row's token and expert; offsets the cumulative row
    counts (grouped_mm's), counts the same as ints (the per-expert loop's)."""
    order: torch.Tensor
    inverse: torch.Tensor
    token: torch.Tensor
    expert: torch.Tensor
    offsets: torch.Tensor
    counts: list
    n: int
    k: int


def _grouped_mm_fits(x, weight) -> bool:
    """torch's grouped_mm has a CPU kernel (with autograd) from 2.9, up to 2.10 only for
    16-byte aligned operands, and always only for rows whose byte strides are multiples of
    16 (its backward's too: in and out); on other devices its dtype and architecture limits
    vary, and inductor (--compile) lowers it for bfloat16 only. Elsewhere the per-expert
    loop runs: one matmul per expert, the same products."""
    size = x.element_size()
    return (x.device.type == "cpu" and hasattr(F, "grouped_mm")
            and not torch.compiler.is_compiling()
            and _torch_version() >= (2, 11) and x.dtype == weight.dtype
            and weight.shape[-1] * size % 16 == 0 and weight.shape[-2] * size % 16 == 0)


def _torch_version() -> tuple:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def _grouped_mm_operand(w):
    """grouped_mm wants one of the last two dimensions contiguous: an adapter's B (E, r, out),
    taken from PEFT's (out, r*E) layout, is neither."""
    return w if w.stride(-1) == 1 or w.stride(-2) == 1 else w.contiguous()


class _Gather(torch.autograd.Function):
    """x[index] along dim 0 whose gradient is another gather, grad[back] (with zero_row,
    a position equal to len(grad) reads zeros), instead of index_select's scatter-add: packed attention's
    index and back are inverse permutations apart from the padding of each example, which
    receives no gradient (causality hides it from every real query)."""

    @staticmethod
    def forward(ctx, x, index, back, zero_row):
        ctx.save_for_backward(back)
        ctx.zero_row = zero_row
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        if ctx.zero_row:
            grad = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
        return grad.index_select(0, back), None, None, None


class _RmsNorm(torch.autograd.Function):
    """F.rms_norm's products (x * rsqrt(mean(x^2) + eps) * w) for a frozen w, whose
    backward is dL/dx = r * (g w - x r^2 mean(g w x)): four passes over (N, C) instead of
    the composite's chain of autograd nodes, and only x and r are saved."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        gw = g * weight
        dot = torch.linalg.vecdot(gw, x, dim=-1).unsqueeze(-1)  # sum(g w x), no temporary
        gx = x * (dot * r.pow(3) * (-1.0 / x.shape[-1]))
        return gx.addcmul_(gw, r), None, None


class _Rope(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin (rotate_half(x) = [-x2, x1]) in two passes over x
    instead of five (neg, cat, two products, the sum), and its backward likewise: dL/dx =
    g * cos + [g2 * sin2, -g1 * sin1]. Only the tables are saved; they carry no gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        h = x.shape[-1] // 2
        y = x * cos
        y[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
        y[..., h:].addcmul_(x[..., :h], sin[..., h:])
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        gx = g * cos
        gx[..., :h].addcmul_(g[..., h:], sin[..., h:])
        gx[..., h:].addcmul_(g[..., :h], sin[..., :h], value=-1)
        return gx.to(ctx.dtype), None, None


def _picked_log_probs(probs, targets, logits_of_rows):
    """log p of each row's target from its softmax row; a row where that probability is
    below float32's normal range (a loss above ~87 nats) takes it from log_softmax of its
    logits, formed again for those rows only (`logits_of_rows(rows)`)."""
    picked = probs.gather(1, targets[:, None])[:, 0]
    out = picked.log()
    tiny = picked < torch.finfo(probs.dtype).tiny
    if bool(tiny.any()):
        rows = tiny.nonzero()[:, 0]
        out[rows] = torch.log_softmax(logits_of_rows(rows), dim=-1).gather(
            1, targets[rows, None])[:, 0]
    return out


def _chunk_logits(h, weight, softcap, out=None):
    """float32 logits h W^T of a chunk of rows, soft-capped when the model caps them;
    written into `out` by the GEMM itself when given (float32 operands)."""
    logits = F.linear(h, weight).float() if out is None else torch.mm(h, weight.t(), out=out)
    if softcap is not None:
        logits = logits.div_(softcap).tanh_().mul_(softcap)
    return logits


class _LoraLinear(torch.autograd.Function):
    """A frozen linear with its LoRA pair in one output buffer: the low-rank update is
    accumulated into x W^T by the GEMM itself (addmm_, beta = 1), and in the backward the
    adapter's share of dL/dx into W's, so neither direction makes an (N, out) or (N, in)
    temporary and a separate add pass over it. The products are those of
    linear(x, W) + linear(linear(x, A) * s, B)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        low = (x2 @ lora_a.t()).mul_(scale)  # (N, r), s on the thin side
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        y.addmm_(low, lora_b.t())
        ctx.save_for_backward(x2, weight, lora_a, lora_b, low)
        ctx.scale, ctx.shape = scale, x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, lora_a, lora_b, low = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need = ctx.needs_input_grad
        glow = (g @ lora_b).mul_(ctx.scale)  # dL/d(x A^T)
        gx = None
        if need[0]:
            gx = g @ weight
            gx.addmm_(glow, lora_a)
            gx = gx.reshape(ctx.shape)
        gbias = g.sum(0) if need[2] else None
        ga = glow.t() @ x2 if need[3] else None
        gb = g.t() @ low if need[4] else None
        return gx, None, gbias, ga, gb, None


class _LoraLinears(torch.autograd.Function):
    """Frozen linears of one input x with their LoRA pairs (q, k, v; gate, up), as
    _LoraLinear gives each, with the thin products formed once for all: x [A_1; A_2; ...]^T
    one (N, r_1 + r_2 + ...) matmul, and in the backward dL/d[A_1; ...] and the adapters'
    share of dL/dx one each, so the (N, in) input and gradient are read once rather than
    once per projection. The bases' dL/dx accumulate into one buffer (addmm_) too, instead
    of autograd summing one (N, in) gradient per projection. Arguments after x and the
    scale: weight, bias, A, B for each projection."""

    @staticmethod
    def forward(ctx, x, scale, *flat):
        x2 = x.reshape(-1, x.shape[-1])
        weights, biases, a_s, b_s = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
        lora_a = torch.cat(a_s)  # (sum r, in): a copy of the small factors only
        low = (x2 @ lora_a.t()).mul_(scale)  # (N, sum r)
        ends = []
        for a in a_s:
            ends.append((ends[-1] if ends else 0) + a.shape[0])
        outs = []
        for w, bias, lb, r0, r1 in zip(weights, biases, b_s, [0] + ends[:-1], ends):
            y = x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
            y.addmm_(low[:, r0:r1], lb.t())
            outs.append(y.reshape(*x.shape[:-1], w.shape[0]))
        ctx.save_for_backward(x2, lora_a, low, *weights, *b_s)
        ctx.scale, ctx.shape, ctx.ends = scale, x.shape, ends
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, lora_a, low, *rest = ctx.saved_tensors
        n = len(ctx.ends)
        weights, b_s = rest[:n], rest[n:]
        need = ctx.needs_input_grad  # x, scale, then weight, bias, A, B per projection
        # (bases and biases are frozen here: lora_linears takes autograd's path otherwise)
        starts = [0] + ctx.ends[:-1]
        gs = [g.reshape(-1, g.shape[-1]) for g in grads]
        glow = torch.cat([g @ lb for g, lb in zip(gs, b_s)], dim=1).mul_(ctx.scale)
        gx = None
        if need[0]:
            gx = gs[0] @ weights[0]
            for g, w in zip(gs[1:], weights[1:]):
                gx.addmm_(g, w)
            gx.addmm_(glow, lora_a)
            gx = gx.reshape(ctx.shape)
        ga = glow.t() @ x2 if any(need[4::4]) else None
        out = [gx, None]
        for j, (g, r0, r1) in enumerate(zip(gs, starts, ctx.ends)):
            gb = g.t() @ low[:, r0:r1] if need[5 + 4 * j] else None
            out += [None, None, ga[r0:r1] if need[4 + 4 * j] else None, gb]
        return tuple(out)


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked lm-head + cross-entropy whose backward is computed in the forward pass.

    On the CPU (float32) every chunk's logits are written into one buffer and turned into
    probabilities there (softmax in place): glibc hands an allocation over 32 MiB straight
    back to the kernel when it is freed, so a fresh (rows, V) tensor per chunk paid a page
    fault per 4 KiB each time it was first written (two per chunk; ~0.2 s of a 2.5 s step
    at bench_train's shape). CUDA's caching allocator reuses its blocks, and there (and in
    half precision, whose logits are cast) the logits and the probabilities stay two
    tensors (CUDA's softmax is not relied on to write over its input)."""

    @staticmethod
    def forward(ctx, h, weight, targets, mask, chunk_rows, softcap=None, per_token=False):
        need_grad = h.requires_grad and torch.is_grad_enabled() or ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        tokens = torch.empty(h.shape[0], dtype=torch.float32, device=h.device) \
            if per_token else None
        grad_h = torch.empty_like(h) if need_grad else None
        in_place = need_grad and h.device.type == "cpu" and h.dtype == weight.dtype \
            == torch.float32
        buffer = torch.empty((min(chunk_rows, h.shape[0]), weight.shape[0]),
                             dtype=torch.float32, device=h.device) if in_place else None
        for start in range(0, h.shape[0], chunk_rows):
            sl = slice(start, start + chunk_rows)
            hs, row = h[sl], mask[sl, None]
            logits = _chunk_logits(hs, weight, softcap,
                                   buffer[:hs.shape[0]] if in_place else None)
            slope = None  # dc/dz = 1 - (c / cap)^2 of soft-capped logits c
            if need_grad:  # the probabilities are what the gradient needs: one kernel
                if in_place:  # the slope first, in a buffer of its own
                    if softcap is not None:
                        slope = (logits / softcap).square_().neg_().add_(1)
                    probs = torch.softmax(logits, dim=-1, out=logits)
                else:  # the slope after, in the logits' storage
                    probs = torch.softmax(logits, dim=-1)
                    if softcap is not None:
                        slope = logits.div_(softcap).square_().neg_().add_(1)
                del logits
                picked_logp = _picked_log_probs(
                    probs, targets[sl],
                    lambda rows: _chunk_logits(hs[rows], weight, softcap)) * row[:, 0]
            else:
                # one kernel, not logsumexp's five
                picked_logp = torch.log_softmax(logits, dim=-1).gather(
                    1, targets[sl, None])[:, 0] * row[:, 0]
                del logits
            if per_token:
                tokens[sl] = -picked_logp
            else:
                total -= picked_logp.sum()
            if need_grad:
                # (softmax - onehot) @ W  ==  softmax @ W - W[targets]: no (rows, V) one-hot;
                # the mask scales the (rows, C) result, not the (rows, V) probabilities
                picked = weight[targets[sl]]
                if slope is not None:  # times the slope, the picked column's too
                    picked = picked * slope.gather(1, targets[sl, None]).to(weight.dtype)
                    probs.mul_(slope)
                    del slope
                g = probs.to(weight.dtype) @ weight
                g -= picked
                g *= row.to(weight.dtype)
                grad_h[sl] = g.to(h.dtype)
                del probs, g, picked  # free this chunk before the next one is formed
        ctx.save_for_backward(grad_h)
        ctx.per_token = per_token
        return tokens if per_token else total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        if ctx.per_token:  # one cotangent per token: scales that token's row of dL/dh
            grad_out = grad_out[:, None]
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None, None, None


def _join_process_group(device: str) -> None:
    """torchrun's environment -> the default process group: NCCL between CUDA devices,
    gloo otherwise (the CPU, MPS). Left cleanly at exit."""
    import atexit
    from datetime import timedelta

    if not dist.is_available():
        from lorafit.core.errors import LorafitError
        raise LorafitError("this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=timedelta(minutes=30))
        atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


def _collective(fn, *args):
    """A collective; a peer that is gone becomes one line instead of a C++ traceback."""
    try:
        return fn(*args)
    except RuntimeError as e:  # DistBackendError and gloo's errors are RuntimeErrors
        from lorafit.core.errors import LorafitError
        text = _short(e)
        raise LorafitError(f"lost contact with another training process (it stopped or "
                           f"died): {text}") from None


def _short(e: BaseException) -> str:
    """gloo's / NCCL's message without its source location and advice."""
    import re

    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", " ".join(str(e).split()))
    return text.split(". ")[0][:160]
