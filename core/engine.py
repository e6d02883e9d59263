"""The generation engine: continuous batching over a preallocated KV cache, each row of a
batch with its own adapter.

Every generation in lorafit runs here (`lorafit generate`, the TUI's try-it, `lorafit
serve`). Sequences join the running batch between decode steps: a new one is prefilled on
its own (one forward over its prompt, written into a free cache row), then decodes with the
others, one token per row per forward. Rows stay packed at the front of the cache, so a
forward reads a slice of it; a finished row's slot is filled by moving the last row in.

Adapters: an engine either serves the adapter attached to its model (the model's own
leaves and LoRA math, every row alike), or holds any number of adapters by name, stacked
per projection, each row applying its own (core.lora.RowAdapters): the base matmul once per
batch, the low-rank update gathered per row. Slot 0 is the base model.

Models whose layers cannot share a padded cache (linear attention, shared k/v, LongRoPE's
switch; models.kv_cache.batchable) run each row in its own forward, with the same results.

Sampling happens in numpy on each row's last logits, from the request's own seed, so a
request's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lorafit.core.errors import LorafitError
from lorafit.core.lora import LORA_A, LORA_B, MAGNITUDE, STACK_A, STACK_B, STACK_DORA, \
    RowAdapters, adapter_leaves, check_adapter_fits, dense_weight, weight_key
from lorafit.models import decoder
from lorafit.models.kv_cache import SlotCache, batchable

STOP, LENGTH = "stop", "length"  # finish reasons, OpenAI's names


@dataclass
class Request:
    prompt_ids: list
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    adapter: str | None = None  # a name given to Engine.add_adapter; None: the base
    eos_ids: frozenset = frozenset()
    on_token: Callable | None = None
    """on_token(token, finish) on the engine's thread, for each new token; finish is None,
    "stop" (an end-of-sequence token, which is passed too) or "length". Keep it quick."""


@dataclass(eq=False)
class Sequence:
    request: Request
    slot: int  # adapter slot
    rng: np.random.Generator
    length: int = 0  # tokens in the cache
    pending: int | None = None  # the last token, not yet in the cache
    generated: int = 0
    finished: str | None = None
    cancelled: bool = False
    seen: list = field(default_factory=list)  # row-by-row mode: every token so far
    cache: list | None = None  # row-by-row mode: the row's own growing cache


class Engine:
    def __init__(self, model, max_batch: int = 16, max_len: int | None = None):
        self.model, self.ops, self.args = model, model.backend, model.args
        self.max_batch = max_batch
        self.max_len = max_len or min(2048, self.args.max_position_embeddings)
        self.attached = model.lora is not None
        self.params = dict(model.params)
        self.batched = batchable(self.args)
        self.cache = SlotCache(self.ops, self.args, max_batch, self.max_len, model.dtype) \
            if self.batched else None
        self._adapters: dict = {}  # name -> (slot, cfg, {leaf: numpy})
        self._scales = np.zeros(1, np.float32)
        self._users: dict = {}  # name -> sequences waiting or running with it
        self._waiting: deque = deque()
        self._running: list = []
        self._lock = threading.Lock()  # held by a step and by adapter changes
        self.wake = threading.Event()  # set when work arrives
        self.tokens_out = 0  # generated tokens, for throughput lines
        # evaluate lazily built arrays here: a lazy array cannot be evaluated on another
        # thread (the server steps the engine on its own)
        self.ops.materialize(self.params, *(() if self.cache is None else
                                            (self.cache.k, self.cache.v)))

    # -- adapters -----------------------------------------------------------------------
    def add_adapter(self, name: str, cfg, adapter: dict) -> None:
        """Serve `adapter` ({leaf: numpy}, as adapter_io.load_any gives) under `name`.
        Refuses one that does not fit this base model."""
        if self.attached:
            raise LorafitError("this engine serves the adapter attached to its model")
        shapes = self.model.parameter_shapes()
        check_adapter_fits(adapter, shapes)
        if any(len(shapes[weight_key(shapes, k.rsplit('.lora_', 1)[0])]) != 2 for k in adapter):
            raise LorafitError(f"adapter {name}: adapters on MoE experts cannot be served per "
                               "row yet; use lorafit generate")
        with self._lock:
            old = self._adapters.get(name)
            slot = old[0] if old else len(self._adapters) + 1
            self._adapters[name] = (slot, cfg, adapter)
            self._restack()

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if self._users.get(name):
                raise LorafitError(f"adapter {name} is in use")
            if self._adapters.pop(name, None) is not None:
                self._restack()

    def adapters(self) -> list:
        return sorted(self._adapters)

    def in_use(self, name: str) -> int:
        return self._users.get(name, 0)

    def _renumber(self) -> None:
        """Slots 1..k for the k adapters held, in their order so far, so the stacks hold no
        empty slot once one is removed; waiting and running rows follow their adapter."""
        order = sorted(self._adapters.items(), key=lambda kv: kv[1][0])
        for new, (name, (_, cfg, adapter)) in enumerate(order, 1):
            self._adapters[name] = (new, cfg, adapter)
        for seq in list(self._waiting) + self._running:
            if seq.request.adapter in self._adapters:
                seq.slot = self._adapters[seq.request.adapter][0]

    def _restack(self) -> None:
        """Rebuild every projection's stacked A, B from the adapters held (with the lock
        held, between steps)."""
        self._renumber()
        ops, shapes = self.ops, self.model.parameter_shapes()
        for k in [k for k in self.params if k.endswith((STACK_A, STACK_B, STACK_DORA))]:
            del self.params[k]
        n = max([s for s, _, _ in self._adapters.values()], default=0) + 1
        self._scales = np.zeros(n, np.float32)
        modules = {}
        for slot, cfg, adapter in self._adapters.values():
            self._scales[slot] = cfg.scale
            for k in adapter:
                if k.endswith(LORA_A):
                    modules.setdefault(k[:-len(LORA_A) - 1], []).append((slot, adapter))
        for module, users in modules.items():
            d_out, d_in = shapes[module + ".weight"]
            r = max(a[f"{module}.{LORA_A}"].shape[0] for _, a in users)
            stack_a = np.zeros((n, r, d_in), np.float32)
            stack_b = np.zeros((n, d_out, r), np.float32)
            for slot, a in users:
                la, lb = a[f"{module}.{LORA_A}"], a[f"{module}.{LORA_B}"]
                stack_a[slot, :la.shape[0]] = la
                stack_b[slot, :, :lb.shape[1]] = lb
            self.params[f"{module}.{STACK_A}"] = ops.from_numpy(stack_a, self.model.dtype)
            self.params[f"{module}.{STACK_B}"] = ops.from_numpy(stack_b, self.model.dtype)
            dora = [(slot, a) for slot, a in users if f"{module}.{MAGNITUDE}" in a]
            if dora:
                factors = np.ones((n, d_out), np.float32)
                for slot, a in dora:
                    factors[slot] = self._dora_factor(module, a, self._scales[slot])
                self.params[f"{module}.{STACK_DORA}"] = ops.from_numpy(factors,
                                                                       self.model.dtype)
        ops.materialize({k: v for k, v in self.params.items()
                         if k.endswith((STACK_A, STACK_B, STACK_DORA))})

    def _dora_factor(self, module: str, adapter: dict, scale: float) -> np.ndarray:
        """DoRA's m / ||W + s B A||_row, computed as core.lora.project does (in the
        adapter's dtype, on the backend), once: at inference it is a constant."""
        ops, dtype = self.ops, self.model.dtype
        la, lb = (ops.from_numpy(adapter[f"{module}.{k}"], dtype) for k in (LORA_A, LORA_B))
        quant = self.args.quantization if module + ".scales" in self.params else None
        dense = ops.cast(dense_weight(ops, self.params, module, quant), dtype)
        norm = ops.row_norms(dense + scale * ops.linear(lb, ops.swapaxes(la, 0, 1)))
        m = ops.from_numpy(adapter[f"{module}.{MAGNITUDE}"], dtype)
        return ops.to_numpy(ops.cast(m / norm, "float32"))

    def memory_bytes(self) -> dict:
        """Bytes held: the model's weights, the adapters' stacks, the KV cache."""
        ops = self.ops
        with self._lock:  # another thread may be restacking (adapters load in workers)
            stacks = sum(ops.nbytes(v) for k, v in self.params.items()
                         if k.endswith((STACK_A, STACK_B, STACK_DORA)))
        weights = sum(ops.nbytes(v) for k, v in self.model.params.items())
        return {"weights": weights, "adapters": stacks,
                "kv_cache": self.cache.nbytes() if self.cache else 0}

    # -- requests -----------------------------------------------------------------------
    def submit(self, req: Request) -> Sequence:
        """Queue a request; it joins the batch at the next step. Raises LorafitError for a
        request this engine cannot run (empty or too long prompt, unknown adapter...)."""
        if not req.prompt_ids:
            raise LorafitError("the prompt is empty after tokenisation")
        if req.temperature < 0:
            raise LorafitError(f"temperature must be >= 0, got {req.temperature}")
        if not 0 < req.top_p <= 1:
            raise LorafitError(f"top_p must be in (0, 1], got {req.top_p}")
        if len(req.prompt_ids) >= self.max_len:
            raise LorafitError(f"the prompt has {len(req.prompt_ids)} tokens; this engine "
                               f"holds at most {self.max_len} per sequence")
        with self._lock:
            if req.adapter is None:
                slot = 0
            elif req.adapter in self._adapters:
                slot = self._adapters[req.adapter][0]
                self._users[req.adapter] = self._users.get(req.adapter, 0) + 1
            else:
                raise LorafitError(f"no adapter named {req.adapter!r} is loaded")
            seq = Sequence(req, slot, np.random.default_rng(req.seed),
                           seen=list(req.prompt_ids))
            self._waiting.append(seq)
        self.wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence (its client went away); its row is freed at the next step."""
        seq.cancelled = True
        self.wake.set()

    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    def running(self) -> int:
        return len(self._running)

    def abort_all(self) -> None:
        """Drop every sequence after a failed step, telling each with on_token(None,
        "error"), so the engine serves again from a clean state."""
        with self._lock:
            for seq in list(self._waiting) + self._running:
                self._release(seq)
                if seq.request.on_token is not None and not seq.cancelled:
                    seq.request.on_token(None, "error")
            self._waiting.clear()
            self._running.clear()

    def step(self) -> bool:
        """One round: retire finished rows, admit waiting sequences (prefill), one decode
        forward for all running rows. Returns whether work remains."""
        with self._lock:
            self._retire()
            new = []
            while self._waiting and len(self._running) < self.max_batch:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    self._release(seq)
                    continue
                self._running.append(seq)
                new.append(seq)
            if new:
                self._prefill(new, len(self._running) - len(new))
            self._retire()
            if self._running:
                self._decode()
            self._retire()
            return bool(self._waiting or self._running)

    def run_until_done(self) -> None:
        while self.step():
            pass

    def _release(self, seq: Sequence) -> None:
        name = seq.request.adapter
        if name is not None:
            self._users[name] -= 1
            if not self._users[name]:
                del self._users[name]

    def _retire(self) -> None:
        run, i = self._running, 0
        while i < len(run):
            seq = run[i]
            if not (seq.finished or seq.cancelled):
                i += 1
                continue
            last = run.pop()
            if last is not seq:
                if self.cache is not None:
                    self.cache.copy_row(len(run), i, last.length)
                run[i] = last
            self._release(seq)

    # -- forwards -----------------------------------------------------------------------
    def _forward(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, cache,
                 last: np.ndarray | None = None):
        """Logits (B, V) as float64 numpy at each row's position `last` (default: the
        last one)."""
        ops = self.ops
        b, t = ids.shape
        if self.attached:
            lora = self.model.lora
        else:
            lora = RowAdapters(ops.from_numpy(np.repeat(slots, t)[:, None].astype(np.int64)),
                               ops.from_numpy(np.repeat(self._scales[slots], t)
                                              .reshape(b, t, 1), self.model.dtype))
        with ops.inference():
            h = decoder.hidden_states(ops, self.args, self.params, ops.from_numpy(ids),
                                      ops.from_numpy(positions), cache=cache, lora=lora)
            h = h[:, -1, :] if last is None else \
                h[ops.from_numpy(np.arange(b)), ops.from_numpy(last.astype(np.int64))]
            logits = decoder.head(ops, self.args, h, decoder.output_weight(self.params))
            out = ops.to_numpy(ops.cast(logits, "float32")).astype(np.float64)
        if self.cache is not None:
            ops.materialize(self.cache.k, self.cache.v)
        return out

    def _prefill(self, seqs: list, first: int) -> None:
        """Newly admitted sequences' prompts in one forward, right-padded to the longest
        (rows first, first + 1, ...; a padded position is written but never attended to:
        the row's length ends before it). Row-by-row models prefill each alone."""
        if self.cache is None:
            for seq in seqs:
                prompt = np.asarray([seq.request.prompt_ids], np.int64)
                seq.cache = [[None, None] for _ in range(self.args.num_hidden_layers)]
                logits = self._forward(prompt, np.arange(prompt.shape[1])[None],
                                       np.array([seq.slot]), seq.cache)
                seq.length = prompt.shape[1]
                self._emit(seq, logits[0])
            return
        sizes = np.asarray([len(s.request.prompt_ids) for s in seqs])
        n, t = len(seqs), int(sizes.max())
        ids = np.zeros((n, t), np.int64)
        for i, s in enumerate(seqs):
            ids[i, :sizes[i]] = s.request.prompt_ids
        pos = np.broadcast_to(np.arange(t, dtype=np.int64), (n, t)).copy()
        logits = self._forward(ids, pos, np.asarray([s.slot for s in seqs]),
                               self.cache.views(first, np.zeros(n, np.int64), t), sizes - 1)
        for seq, size, row in zip(seqs, sizes, logits):
            seq.length = int(size)
            self._emit(seq, row)

    def _decode(self) -> None:
        run = self._running
        if self.cache is None:
            for seq in run:
                self._decode_alone(seq)
            return
        ids = np.asarray([[s.pending] for s in run], np.int64)
        starts = np.asarray([s.length for s in run], np.int64)
        slots = np.asarray([s.slot for s in run])
        logits = self._forward(ids, starts[:, None], slots, self.cache.views(0, starts, 1))
        for seq, row in zip(run, logits):
            seq.length += 1
            self._emit(seq, row)

    def _decode_alone(self, seq: Sequence) -> None:
        """One step of one row with its own growing cache (models batchable() refuses)."""
        reset = self.args.cache_reset_length
        ids = np.asarray([[seq.pending]], np.int64)
        pos = np.asarray([[seq.length]], np.int64)
        if reset is not None and seq.length == reset:
            # the rotary frequencies switch here: recompute the cache with the new set
            seq.cache = [[None, None] for _ in range(self.args.num_hidden_layers)]
            ids = np.asarray([seq.seen], np.int64)
            pos = np.arange(len(seq.seen), dtype=np.int64)[None]
        logits = self._forward(ids, pos, np.array([seq.slot]), seq.cache)
        seq.length += 1
        self._emit(seq, logits[0])

    def _emit(self, seq: Sequence, logits: np.ndarray) -> None:
        req = seq.request
        token = pick(logits, req.temperature, req.top_p, seq.rng)
        seq.generated += 1
        self.tokens_out += 1
        if token in req.eos_ids:
            seq.finished = STOP
        elif seq.generated >= req.max_new_tokens or seq.length >= self.max_len:
            seq.finished = LENGTH
        else:
            seq.pending = token
            seq.seen.append(token)
        if req.on_token is not None and not seq.cancelled:
            req.on_token(token, seq.finished)


def pick(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    """A token from one row's logits: the argmax at temperature 0, else sampled (nucleus
    sampling when top_p < 1)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def attached_leaves(model) -> dict:
    """The adapter attached to a model, as numpy leaves (to serve it by name)."""
    ops = model.backend
    return {k: ops.to_numpy(model.params[k]) for k in adapter_leaves(model.params)}
