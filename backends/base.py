"""The backend contract: the few array operations a model, LoRA and the trainer need.

This module imports no framework. Each backend package (`backends/torch`, `backends/mlx`)
provides a class with exactly these members (tests/backends/test_contract.py checks it),
mapping each op onto its framework's fastest native call. The documentation of an op lives
here, once; backend code stays thin. Callers (models/, core/, commands/) use nothing else and
never branch on a backend's name: what differs between backends is a declared attribute
(`pad_multiple`, `quantization`, `quantized_format`).

By convention the backend object is called `ops` wherever it is passed around.

Array layout conventions used by every op:
  activations  (B, T, C)          batch, time, channels
  attention    (B, H, T, D)       batch, heads, time, head dim
  linear weight (out, in)         as stored by Hugging Face and PEFT
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Protocol, runtime_checkable

import numpy as np

Array = Any  # a backend array: torch.Tensor or mlx.core.array
DTYPES = ("float32", "bfloat16", "float16")
# the prefix of every decoder layer's keys (`model.layers.<i>.`): here, not in models/,
# because backends cut the base layer by layer and import no model
LAYERS = "model.layers."
# the key, within a layer (LAYERS + `<i>.` + it), of that layer's frozen arrays cut
# across processes (Backend.shard_frozen); no checkpoint or adapter name looks like it
SHARDED_LAYER = "\0sharded frozen"
# MLX's CPU attention has no fused kernel: from this length on, causal attention runs a
# block of queries at a time over the keys up to the block's end (backends/mlx
# _causal_blocks), so its probabilities cover less than the (T, T) square; the estimator
# counts the same blocks (core/estimate.py mlx_score_area)
CAUSAL_BLOCKS_FROM = 512
# torch's float32 CPU training runs the same blocks as GEMMs (backends/torch/causal_blocks)
# up to this length, where they beat its flash kernel (0.6-0.9x its time at 512 and 1024
# tokens; at 2048 no faster); past it the kept probabilities, ~T^2 / 2 per head, cost more
# memory than the speed is worth
TORCH_CPU_BLOCKS_UP_TO = 1024


def torch_cpu_blocks(T: int) -> bool:
    """Whether torch's float32 CPU training takes causal attention over T positions in
    query blocks (the estimator asks the same)."""
    return CAUSAL_BLOCKS_FROM <= T <= TORCH_CPU_BLOCKS_UP_TO


def causal_query_blocks(T: int) -> list[tuple[int, int]]:
    """(start, end) of each query block of causal attention over T positions: blocks of
    max(128, T / 8) rows; block i attends to the keys [0, end)."""
    rows = max(128, -(-T // 8))
    return [(start, min(start + rows, T)) for start in range(0, T, rows)]


@runtime_checkable
class Backend(Protocol):
    name: str  # "torch" or "mlx": for messages and records only, never for branching
    device: str  # "cpu", "cuda", "mps", "metal"
    bf16_native: bool  # bfloat16 runs at full speed here: training prefers it to float16

    # -- arrays ---------------------------------------------------------------------------
    def from_numpy(self, a: np.ndarray, dtype: str | None = None) -> Array:
        """Copy a numpy array to the device, optionally casting to a dtype name."""

    def to_numpy(self, x: Array) -> np.ndarray:
        """Copy to host as numpy (bf16 comes back as float32)."""

    def cast(self, x: Array, dtype: str) -> Array:
        """Cast to a dtype name from DTYPES."""

    def dtype_name(self, x: Array) -> str:
        """The dtype of x as a name from DTYPES (or 'int32', 'int64', 'bool')."""

    def zeros(self, shape: tuple, dtype: str = "float32") -> Array: ...

    def concat(self, xs: list, axis: int) -> Array: ...

    def swapaxes(self, x: Array, a: int, b: int) -> Array: ...

    def to_float(self, x: Array) -> float:
        """A scalar array as a Python float: a sync point, used only at report time."""

    def synchronize(self) -> None:
        """Wait for queued work (mx.eval / cuda.synchronize)."""

    def materialize(self, *trees) -> None:
        """Evaluate lazily built arrays now (MLX), so a graph does not grow across
        micro-batches; nothing to do on an eager backend."""

    def inference(self):
        """A context manager under which no autograd graph is recorded."""

    def nbytes(self, x: Array) -> int:
        """Bytes held by an array (or by a quantized weight's scale state)."""

    # -- files ----------------------------------------------------------------------------
    def read_safetensors(self, path, dtype: str, skip: frozenset = frozenset()):
        """Yield (name, array) from one safetensors file, one tensor at a time, floating
        tensors cast to dtype, so no second copy of a shard is ever held; the tensors named
        in skip are not read."""

    def save_safetensors(self, path, arrays: dict) -> None:
        """Write backend arrays (any dtype, bf16 included) to one safetensors file."""

    # -- layers ---------------------------------------------------------------------------
    def linear(self, x: Array, weight: Array, bias: Array | None = None) -> Array:
        """y = x @ weight.T (+ bias); weight is (out, in)."""

    def lora_linear(self, x: Array, weight: Array, bias: Array | None, lora_a: Array,
                    lora_b: Array, scale: float) -> Array:
        """x @ weight.T (+ bias) + ((x @ lora_a.T) * scale) @ lora_b.T: a frozen projection
        with its LoRA pair (no dropout), the same products as the two linears composed;
        a backend may fuse them (one output buffer, the update accumulated into it)."""

    def lora_linears(self, x: Array, projections: list, scale: float) -> list:
        """lora_linear of one input x for each (weight, bias, lora_a, lora_b) in projections
        (q, k, v; gate, up), in order; a backend may form the thin products of all of them
        at once (x read once for the concatenated A's)."""

    def embedding(self, ids: Array, table: Array) -> Array:
        """Rows of table (V, C) picked by integer ids (B, T) -> (B, T, C)."""

    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array:
        """x / sqrt(mean(x^2) + eps) * weight over the last axis, computed in float32
        and returned in x's dtype (Llama's convention)."""

    def layer_norm(self, x: Array, weight: Array, bias: Array, eps: float) -> Array:
        """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (nn.LayerNorm,
        StarCoder 2), computed in float32 and returned in x's dtype."""

    def silu(self, x: Array) -> Array: ...

    def gelu_tanh(self, x: Array) -> Array:
        """GELU with the tanh approximation (gelu_pytorch_tanh, Gemma's GeGLU)."""

    def softmax(self, x: Array) -> Array:
        """Softmax over the last axis, computed and returned in float32 (MoE routers)."""

    def log_softmax(self, x: Array) -> Array:
        """Log-softmax over the last axis, computed and returned in float32 (GRPO's
        per-token log-probabilities)."""

    def exp(self, x: Array) -> Array:
        """e**x element-wise (GRPO's ratios and KL estimate)."""

    def clip(self, x: Array, low: float | None, high: float | None) -> Array:
        """x limited to [low, high] (None: unbounded on that side); zero gradient where
        clipped (gpt-oss's clamped SwiGLU)."""

    def top_k_indices(self, x: Array, k: int) -> Array:
        """Integer indices (..., k) of the k largest entries along the last axis, in no
        particular order (MoE routing; take the values with take_along_axis)."""

    def take_along_axis(self, x: Array, indices: Array) -> Array:
        """x[..., indices] along the last axis: (..., n) and int (..., k) -> (..., k);
        differentiable with respect to x."""

    def gather_linear(self, x: Array, weight: Array, indices: Array) -> Array:
        """Per-row expert projection: x (N, K, in) (K may be 1, broadcast over the K
        choices), weight (E, out, in), int indices (N, K) -> (N, K, out) with
        out[n, j] = x[n, j] @ weight[indices[n, j]].T. Differentiable with respect to x
        and weight; only the N*K chosen rows are computed (per-token adapter stacks; a
        sparse MoE layer's experts use the grouped ops below, one sort for the layer)."""

    def expert_groups(self, indices: Array, experts: int) -> Any:
        """The (token, choice) pairs of int indices (N, K) sorted by expert (0..experts-1),
        for group_rows / grouped_linear / ungroup_rows: one sort per MoE layer that all its
        expert projections and their adapters share. Opaque to callers."""

    def group_rows(self, x: Array, groups: Any) -> Array:
        """x (N, in) -> (N*K, in): each token's row once per choice, in expert order.
        Differentiable with respect to x."""

    def grouped_linear(self, x: Array, weight: Array, groups: Any,
                       bias: Array | None = None) -> Array:
        """x (N*K, in) in expert order, weight (E, out, in) (a transposed view is fine),
        bias (E, out) or None -> (N*K, out): each row through its own expert's weight.
        Differentiable with respect to x, weight and bias; exactly the rows' matmuls."""

    def ungroup_rows(self, y: Array, groups: Any) -> Array:
        """(N*K, out) in expert order -> (N, K, out) in token order (choice j of token n
        at [n, j]). Differentiable with respect to y."""
    def softcap(self, x: Array, cap: float) -> Array:
        """cap * tanh(x / cap) in x's dtype (Gemma's final-logit soft-capping)."""
    def sigmoid(self, x: Array) -> Array: ...

    def log_sigmoid(self, x: Array) -> Array:
        """log(sigmoid(x)), stable for large |x| (preference losses: DPO, ORPO, KTO)."""

    def log1m_exp(self, x: Array) -> Array:
        """log(1 - exp(x)) for x < 0, stable near 0 (ORPO's log-odds of a sequence)."""

    def relu(self, x: Array) -> Array: ...

    def causal_conv1d(self, x: Array, weight: Array, state: Array | None = None,
                      segment_ids: Array | None = None) -> tuple:
        """Depthwise causal convolution over time, no bias, no activation.

        x (B, T, Ch); weight (Ch, K): y_t = sum_j weight[:, j] * x_{t-K+1+j}, with the K-1
        inputs before the first taken from state (B, K-1, Ch) (zeros when None).
        segment_ids (B, T): a tap from another packed example counts as zero. Returns
        (y (B, T, Ch), the last K-1 inputs (B, K-1, Ch): the state for the next call)."""

    def gated_delta_rule(self, q: Array, k: Array, v: Array, a: Array, b: Array,
                         a_log: Array, dt_bias: Array, state: Array | None = None,
                         segment_ids: Array | None = None) -> tuple:
        """The gated delta rule of Gated DeltaNet (qwen3_next, qwen3_5 linear attention).

        q, k (B, T, Hk, Dk); v (B, T, Hv, Dv), each q/k head serving Hv/Hk consecutive v
        heads; a, b (B, T, Hv); a_log, dt_bias (Hv,). In float32: q and k are L2-normalised
        over Dk (x / sqrt(sum x^2 + 1e-6)) and q scaled by Dk^-0.5; beta = sigmoid(b),
        g = -exp(a_log) * softplus(a + dt_bias). With S (B, Hv, Dk, Dv), per step t:
            S = exp(g_t) S;  S += k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t.
        state: S before the first step (zeros when None). segment_ids (B, T): S restarts
        from zero at each packed example's first token. Computed in chunks of at most 64
        steps (the UT form), so the backward keeps one S per chunk, not per step.
        Returns (o (B, T, Hv, Dv) in v's dtype, the final S in float32)."""

    def row_norms(self, w: Array) -> Array:
        """Euclidean norm of each row of a matrix (out, in) -> (out,), in float32."""

    def stop_gradient(self, x: Array) -> Array:
        """x, treated as a constant by differentiation."""

    def dropout(self, x: Array, p: float) -> Array:
        """Inverted dropout with the backend's own RNG; identity when p == 0."""

    def rope_tables(self, positions: Array, inv_freq: np.ndarray, dtype: str) -> tuple:
        """cos and sin tables (B, 1, T, D) for integer positions (B, T) and the
        per-pair inverse frequencies (D/2,), in Hugging Face's half-split layout."""

    def apply_rope(self, x: Array, cos: Array, sin: Array) -> Array:
        """x * cos + rotate_half(x) * sin for x (B, H, T, D)."""

    def attention(self, q: Array, k: Array, v: Array, scale: float,
                  segment_ids: Array | None = None, window: int | None = None,
                  softcap: float | None = None, sinks: Array | None = None,
                  lengths: Array | None = None) -> Array:
        """Causal scaled dot-product attention with grouped-query heads.

        q (B, Hq, T, D); k, v (B, Hkv, S, D) with S >= T: the T queries are the last T
        positions of S (a KV cache). segment_ids (B, T) confine attention to tokens of the
        same packed example (T == S only). window: a query sees only keys less than
        `window` positions behind it (sliding-window layers). softcap: scores become
        softcap * tanh(scores / softcap) before the mask (Gemma 2). sinks (Hq,): one
        learned logit per head that joins each softmax and is then dropped (gpt-oss).
        lengths (B,) int: row b's keys are only its first lengths[b] of the S (a
        preallocated cache, rows of different lengths), and its T queries are positions
        lengths[b] - T .. lengths[b] - 1 (segment_ids must then be None).
        Returns (B, Hq, T, D).
        """

    def write_rows(self, buffer: Array, rows: Array, starts: Array, values: Array) -> Array:
        """Write values (N, H, T, D) into a preallocated buffer (B, H, S, D): row rows[i]
        gets values[i] at time positions starts[i] .. starts[i] + T - 1 (the engine's KV
        cache). rows, starts int (N,). Returns the updated buffer (in place where the
        framework allows it); not differentiable."""

    def cross_entropy(self, logits: Array, targets: Array, mask: Array) -> tuple:
        """Sum of token cross-entropies where mask is 1, and the count of such tokens.
        logits (N, V) in any dtype, computed in float32; targets (N,) int; mask (N,)."""

    def linear_cross_entropy(self, h: Array, weight: Array, targets: Array, mask: Array,
                             chunk_rows: int, softcap: float | None = None,
                             per_token: bool = False) -> tuple:
        """cross_entropy(linear(h, weight), targets, mask) without ever holding the full
        logits: rows are processed `chunk_rows` at a time, and the gradient with respect to
        h is formed in the same pass (softmax - onehot) @ weight, so nothing of size V is
        kept for the backward. h (N, C); weight (V, C) frozen. Returns (sum, count).
        softcap: the logits z become c = softcap * tanh(z / softcap) (in float32) before the
        loss, and the gradient gains the factor dc/dz = 1 - (c / softcap)^2.
        per_token: the first result is the (N,) masked token losses instead of their sum
        (one pass over many sequences whose sums enter the loss differently: DPO's rows),
        differentiable with a cotangent per token."""

    logit_chunk_elements: int  # logits one chunk of linear_cross_entropy holds (core/loss.py)
    quantization: tuple  # supported bit widths for frozen weights, () if none
    quantized_format: str  # "affine" (mlx-lm's group-wise scale+bias) or "nf4" (bitsandbytes)

    def quantization_hint(self, bits: int) -> str:
        """What to do when `bits` is not in `quantization` here (install, other backend)."""

    def quantize(self, w: Array, bits: int, group_size: int) -> tuple:
        """(packed weight, scales, biases) of a (out, in) weight, group-wise affine."""

    def quantized_linear(self, x: Array, w: Array, scales: Array, biases: Array, bits: int,
                         group_size: int) -> Array:
        """x @ dequantize(w)^T without forming the dequantized weight where possible."""

    def dequantize(self, w: Array, scales: Array, biases: Array, bits: int,
                   group_size: int) -> Array: ...

    # -- training -------------------------------------------------------------------------
    def value_and_grad(self, fn: Callable) -> Callable:
        """fn(trainable: dict, *args) -> (loss, aux).  Returns g(trainable, *args) ->
        ((loss, aux), grads) with grads a dict shaped like trainable."""

    pad_multiple: int  # batches are padded to a multiple of this many tokens

    def compile(self, fn: Callable) -> Callable:
        """A compiled version of fn (mx.compile), or fn itself where compiling does not pay."""

    def compile_forward(self, fn: Callable) -> Callable:
        """fn (a loss of the trainable arrays, differentiated by value_and_grad) compiled
        for speed when the user asks (--compile): on torch, fn with its decoder layers
        compiled while it runs (compiled_layer); fn itself on MLX, whose whole step goes
        through `compile` already."""

    def compiled_layer(self, kind: Hashable, fn: Callable) -> Callable:
        """fn (one decoder layer, its weights and activations passed as arguments) as it
        should run: inside a compile_forward function on torch, compiled once per `kind`
        and that compiled function reused by every layer of the kind (fn must then differ
        between layers of a kind only in its arguments); otherwise fn itself."""

    def checkpoint(self, fn: Callable) -> Callable:
        """fn recomputed in the backward pass instead of storing its activations."""

    def make_optimizer(self, params: dict, shard: bool = False, **hyper) -> "Optimizer":
        """AdamW over the given dict of trainable arrays (see Optimizer). shard (--shard,
        several processes): torch keeps 1/N of the state per process under FSDP2, its
        state_to_numpy then a collective every rank calls; MLX raises LorafitError."""

    def global_norm(self, grads: dict) -> Array:
        """sqrt(sum of squares) over all gradient arrays, as a scalar array."""

    def memory_stats(self) -> dict:
        """{'peak': bytes, 'current': bytes, 'source': str} of the device allocator."""

    def measure_peak(self, fn: Callable) -> tuple:
        """(fn(), peak bytes of device arrays while fn ran): the tensor-level peak, from the
        allocator's counter or, where there is none (torch on the CPU), a profiler; None
        when the profiler could not analyse the step (the step itself ran)."""

    def reset_peak_memory(self) -> None: ...

    def seed(self, seed: int) -> None:
        """Seed the backend RNG (dropout, sampling)."""


    # -- several processes ----------------------------------------------------------------
    # Joined at construction when a launcher's environment says so (core/launch.py reads
    # the same variables): torchrun -> torch.distributed (gloo on the CPU, NCCL on CUDA),
    # mlx.launch -> mx.distributed (ring, MPI...). Alone: rank 0 of 1 and no-op collectives.
    rank: int  # this process's index, 0 .. world_size - 1
    world_size: int  # processes training together; 1 when alone

    def all_reduce(self, arrays: dict) -> dict:
        """Each array summed element-wise over all processes (summed in float32, returned
        in its own dtype); the dict itself when alone. A lost peer raises LorafitError."""

    def broadcast(self, arrays: dict) -> dict:
        """Process 0's arrays, on every process (replicas start from the same adapter)."""

    def barrier(self) -> None:
        """Wait until every process reaches this point."""

    def shard_frozen(self, params: dict) -> dict:
        """--shard with several processes: params with each decoder layer's frozen arrays
        replaced by one object holding this process's 1/N of them, under the layer's
        SHARDED_LAYER key (arrays outside the layers stay whole); params itself when
        alone. torch only (MLX raises LorafitError); a quantized base raises too."""

    def read_layer_slice(self, sources: list, dtype: str):
        """--shard while loading: this process's 1/N of one decoder layer's frozen arrays,
        read straight from the safetensors files (only the slice's bytes; the whole layer
        is never held), as the object shard_frozen puts under SHARDED_LAYER. sources:
        (name, shape, [(file, checkpoint key, shape)]) per array, in the layer's layout
        order: the checkpoint tensors whose contents laid end to end are the array (one, or
        one per expert and projection for stacked experts), every one floating-point, cast
        to dtype. torch only (MLX raises LorafitError)."""

    def gather_frozen(self, layer: dict) -> dict:
        """A layer's dict (models.decoder.split_layers) with its sharded frozen arrays
        gathered whole from every process (a collective: all call it for the same layers
        in the same order); the dict itself when it holds none."""

    def launch_command(self, nproc: int, args: list) -> list:
        """The command line that runs `python -m lorafit.cli <args>` as nproc processes on
        this machine with the framework's own launcher (torchrun, mlx.launch)."""


class Optimizer(Protocol):
    """AdamW with PyTorch's update rule (decoupled weight decay, bias correction), so that
    both backends follow the same trajectory. Its state round-trips through numpy."""

    shards: int  # processes its state is spread over: 1 (whole), world_size with --shard

    def step(self, params: dict, grads: dict, lr: float, grad_scale: float = 1.0) -> None:
        """Update params in place (torch) or replace its entries (mlx); grads are
        multiplied by grad_scale first (clipping and loss normalisation)."""

    def state_to_numpy(self) -> dict:
        """{'step': int, 'exp_avg.<name>': array, 'exp_avg_sq.<name>': array}."""

    def load_state_numpy(self, state: dict) -> None: ...
