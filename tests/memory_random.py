"""Random but plausible training configurations for the memory estimator, and their peaks.

`random_cases(seed, n, backend)` draws n configurations from a seeded generator: a family
lorafit supports (every one is drawn in turn), then its shape (hidden size, heads, kv
heads, head dim, layers, a vocabulary from tiny to 150k+, intermediate size, tied or not,
biases) and the run (batch, sequence, packing, recompute, rank, targets, DoRA, 4-bit where
the backend quantizes on the CPU). The config.json is what transformers writes for that
family, so the estimator sees what a user's model folder holds. Models stay tiny (a large
vocabulary comes with a small hidden size) so a CI run measures dozens in minutes.

`python tests/memory_random.py BACKEND SEED N [SEED N ...]` measures each case in this
process and prints one JSON line per case (with its seed and each measured step's peak: on
MLX the highest of steps 2..6, whose peak moves step to step; `--families a,b` draws those
families only, for a sweep; `--steps K` measures K steps); tests/core/test_estimate_random.py
runs it once per backend for the seeded grid and the fresh configuration together, so the
imports and the first compile are paid once, and earlier tests leave nothing in the measured
process. The frozen weights are drawn in float32 (their values do not change the peak).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from memory_harness import Case  # noqa: E402

# model_type -> overrides of its config class, drawn from (rng, layers, head_dim)
DENSE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "olmo3", "ministral3",
         "granite", "smollm3", "exaone4", "starcoder2", "glm4", "gemma2", "gemma3_text",
         "gemma4_text", "qwen3_5_text", "qwen3_next", "mixtral", "qwen3_moe", "gpt_oss")
# families that joined after the seeded grid was measured: each draws one case per call
# from its own stream (seed, i + 1), so adding one leaves every earlier seeded case as it was
LATER = ("qwen3_5_moe_text",)
HYBRID = ("qwen3_5_text", "qwen3_next", "qwen3_5_moe_text")
SPARSE_MOE = ("mixtral", "qwen3_moe", "gpt_oss", "qwen3_5_moe_text")


def _types(rng, L, a="sliding_attention", b="full_attention"):
    return [str(rng.choice([a, b])) for _ in range(L)]


def _family_overrides(mt: str, rng, L: int, D: int, T: int) -> dict:
    """Family switches with random values: windows shorter or longer than the sequence,
    soft-caps, MoE sizes, hybrid layer layouts."""
    window = int(rng.choice([max(4, T // 3), 4 * T]))
    r = lambda *xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    if mt == "llama":
        return dict(attention_bias=bool(rng.integers(2)), mlp_bias=bool(rng.integers(2)))
    if mt == "mistral":
        return dict(sliding_window=window)
    if mt == "qwen2":
        return dict(use_sliding_window=bool(rng.integers(2)), sliding_window=window,
                    max_window_layers=int(rng.integers(0, L + 1)))
    if mt == "qwen3":
        return dict(attention_bias=bool(rng.integers(2)))
    if mt == "phi3":
        return dict(partial_rotary_factor=r(1.0, 0.5))
    if mt == "olmo2":
        return dict(attention_bias=bool(rng.integers(2)))
    if mt == "olmo3":
        return dict(sliding_window=window, layer_types=_types(rng, L))
    if mt == "ministral3":
        return dict(rope_parameters=dict(
            rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=8,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.5,
            llama_4_scaling_beta=0.1))
    if mt == "granite":
        return dict(embedding_multiplier=3.0, residual_multiplier=0.5,
                    attention_multiplier=0.2, logits_scaling=4.0,
                    attention_bias=bool(rng.integers(2)))
    if mt == "smollm3":
        return dict(no_rope_layer_interval=r(2, 3, 4))
    if mt == "exaone4":
        return dict(sliding_window=window, sliding_window_pattern=r(2, 4))
    if mt == "starcoder2":
        return dict(sliding_window=r(None, window), use_bias=bool(rng.integers(2)))
    if mt == "glm4":
        return dict(attention_bias=bool(rng.integers(2)), partial_rotary_factor=r(0.5, 1.0))
    if mt == "gemma2":
        return dict(sliding_window=window, attn_logit_softcapping=r(None, 50.0),
                    final_logit_softcapping=r(None, 30.0), query_pre_attn_scalar=D)
    if mt == "gemma3_text":
        return dict(sliding_window=window, query_pre_attn_scalar=D, layer_types=_types(rng, L))
    if mt == "gemma4_text":
        shared = int(rng.integers(0, L // 2 + 1))
        per_layer = r(0, 8)
        types = _types(rng, L)
        types[-1] = "full_attention"  # as the config class makes it
        # a kv-sharing layer reuses the last earlier layer of its type: give it one (no
        # draw changes, nor any valid config, the seeded grid's; lorafit rejects the rest)
        first = L - shared
        for t in types[first:]:
            if first and t not in types[:first]:
                types[first - 1] = t
        return dict(global_head_dim=2 * D, sliding_window=window, layer_types=types,
                    num_kv_shared_layers=shared, use_double_wide_mlp=bool(rng.integers(2)),
                    hidden_size_per_layer_input=per_layer,
                    attention_k_eq_v=bool(rng.integers(2)), num_global_key_value_heads=1)
    if mt in HYBRID:
        kh = r(1, 2)
        extra = dict(layer_types=[("full_attention" if i % 3 == 2 else "linear_attention")
                                  for i in range(L)],
                     linear_num_key_heads=kh, linear_num_value_heads=kh * r(1, 2),
                     linear_key_head_dim=r(8, 16), linear_value_head_dim=r(8, 16))
        if mt == "qwen3_next":
            extra["num_experts"] = 0
        if mt == "qwen3_5_moe_text":  # routed experts and a gated shared expert
            extra.update(num_experts=r(2, 4), num_experts_per_tok=r(1, 2),
                         moe_intermediate_size=int(rng.integers(2, 9)) * 8,
                         shared_expert_intermediate_size=int(rng.integers(2, 9)) * 8)
        return extra
    if mt == "mixtral":
        return dict(num_local_experts=r(2, 4), num_experts_per_tok=r(1, 2),
                    sliding_window=r(None, window))
    if mt == "qwen3_moe":
        return dict(num_experts=r(2, 4), num_experts_per_tok=r(1, 2),
                    moe_intermediate_size=int(rng.integers(2, 9)) * 8, decoder_sparse_step=1,
                    mlp_only_layers=[int(rng.integers(L))] if L > 1 else [],
                    norm_topk_prob=bool(rng.integers(2)))
    if mt == "gpt_oss":
        return dict(num_local_experts=r(2, 4), num_experts_per_tok=r(1, 2),
                    sliding_window=window, attention_bias=True,
                    layer_types=_types(rng, L))
    raise ValueError(mt)


# targets that name projections of every attention family; "all-linear" adapts every one
TARGET_SETS = ("all-linear", "q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj",
               "o_proj,down_proj", "all-linear")
HYBRID_TARGETS = ("all-linear", "q_proj,v_proj,o_proj")


def random_case(rng, family: str, backend: str, name: str) -> Case:
    """One configuration of `family`, sized so a step runs in well under a second."""
    import transformers

    r = lambda *xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    big_vocab = rng.random() < 0.25
    vocab = int(rng.integers(150_000, 160_000)) if big_vocab else \
        int(np.exp(rng.uniform(np.log(64), np.log(40_000))))
    D = r(8, 16, 32, 64)
    kv = r(1, 2, 4)
    heads = kv * r(1, 2, 4)
    hidden = r(32, 48) if big_vocab else r(32, 64, 96, 128)
    L = int(rng.integers(1, 4))
    hybrid = family in HYBRID
    if hybrid:  # DeltaNet layers with an attention layer every third, as the real models
        L = 3
    inter = int(hidden * rng.uniform(1.5, 4.0)) // 8 * 8 or 8
    seq = int(r(16, 32, 48, 64))
    batch = int(rng.integers(1, 3))
    if big_vocab:  # keep the step short: a 150k head on few tokens
        batch, seq = 1, min(seq, 32)
    over = _family_overrides(family, rng, L, D, seq)
    if family == "gemma4_text":  # as the real checkpoints: a per-layer row for every token
        # id (a smaller table fails on ids past it in transformers and lorafit alike)
        over["vocab_size_per_layer_input"] = vocab
    cls = transformers.AutoConfig.for_model(family).__class__
    base = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=D, max_position_embeddings=4096, rms_norm_eps=1e-6,
                tie_word_embeddings=bool(rng.integers(2)), bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
    if family in ("mixtral", "gpt_oss"):
        base["intermediate_size"] = int(rng.integers(2, 9)) * 8
    cfg = cls(**{**base, **over}).to_dict()
    cfg["model_type"] = family
    targets = r(*(HYBRID_TARGETS if hybrid else TARGET_SETS))
    if family == "phi3" and targets != "all-linear":
        targets = "qkv_proj,o_proj"
    if family == "starcoder2":  # its MLP is c_fc, c_proj
        targets = targets.replace("down_proj", "c_proj")
    if family in SPARSE_MOE and "down_proj" in targets:
        targets = "q_proj,v_proj"
    # 4-bit also on narrow models: their projections stay dense (input size not a multiple
    # of 64) while output-sized biases are multiples of 64, which must stay dense too
    quant = "4bit" if rng.random() < 0.15 else None
    rank = r(4, 8, 16, 32, 64)
    recompute, pack, dora = bool(rng.integers(2)), bool(rng.integers(2)), rng.random() < 0.2
    if dora and family in ("mixtral", "qwen3_moe") and targets == "all-linear":
        dora = False  # its stacked experts take plain LoRA only (lorafit refuses DoRA there)
    return Case(name, layers=L, hidden=hidden, intermediate=inter, heads=heads,
                kv_heads=kv, vocab=vocab, tied=cfg.get("tie_word_embeddings", False),
                batch=batch, seq=seq, rank=rank, targets=targets,
                grad_checkpoint=recompute, pack=pack,
                model_type=family, dora=dora, quantize=quant,
                extra=cfg)


def random_cases(seed: int | None, n: int, backend: str,
                 families: tuple | None = None) -> list[Case]:
    """n cases of DENSE, drawn in turn (shuffled), so n >= len(DENSE) draws each; then one
    case of each LATER family from its own stream. `families`: n cases of those only, in
    turn, from the seed's stream (a sweep over a few families; not the grid's draws)."""
    rng = np.random.default_rng(seed)
    order = list(DENSE) if families is None else list(families)
    out = []
    while len(out) < n:
        rng.shuffle(order)
        for fam in order[: n - len(out)]:
            out.append(random_case(rng, fam, backend, f"{fam}-{len(out)}"))
    for i, fam in enumerate(LATER if families is None else ()):
        own = np.random.default_rng(None if seed is None else [seed, i + 1])
        out.append(random_case(own, fam, backend, f"{fam}-{len(out)}"))
    return out


def describe(case: Case) -> str:
    c = case
    return (f"{c.model_type} C{c.hidden} F{c.intermediate} L{c.layers} H{c.heads}/"
            f"{c.kv_heads} D{c.extra.get('head_dim')} V{c.vocab}{' tied' if c.tied else ''} "
            f"b{c.batch}x{c.seq} r{c.rank} {c.targets}{' rc' if c.grad_checkpoint else ''}"
            f"{' pack' if c.pack else ''}{' dora' if c.dora else ''}"
            f"{' ' + c.quantize if c.quantize else ''}")


def run(backend: str, draws: list[tuple[int | None, int]],
        families: tuple | None = None, steps: int | None = None) -> None:
    """Estimate and measure each case of each (seed, n) draw; one JSON line each (errors
    are lines too), with each measured step's peak (`steps` of them; the harness's count
    for the backend unless given) and their highest as the measured peak."""
    import gc

    from lorafit.core.estimate import estimate
    from lorafit.models import memory_shape
    from memory_harness import measured_steps, settings_for, step_peaks

    root = Path(tempfile.mkdtemp())
    cases = [(seed, case) for seed, n in draws
             for case in random_cases(seed, n, backend, families)]
    for seed, case in cases:
        t = time.time()
        try:
            est = estimate(memory_shape(case.config()), settings_for(case, backend))
            peaks = step_peaks(case, backend, root, 2, steps or measured_steps(backend))
            got = max(peaks)
            line = dict(seed=seed, name=case.name, case=describe(case),
                        estimate=est["total"],
                        measured=got, error=(est["total"] - got) / got, phase=est["phase"],
                        steps=peaks, seconds=round(time.time() - t, 1))
        except Exception as e:  # noqa: BLE001 (reported; the test fails on it)
            line = dict(seed=seed, name=case.name, case=describe(case),
                        failed=f"{type(e).__name__}: {e}")
        print(json.dumps(line), flush=True)
        shutil.rmtree(root / case.name, ignore_errors=True)
        gc.collect()


if __name__ == "__main__":
    # python tests/memory_random.py BACKEND SEED N [SEED N ...] [--families a,b] [--steps K]
    args, families, steps = sys.argv[2:], None, None
    if "--steps" in args:  # measure K steps after the first (a study of step-to-step peaks)
        at = args.index("--steps")
        steps = int(args[at + 1])
        args = args[:at] + args[at + 2:]
    if "--families" in args:
        at = args.index("--families")
        families = tuple(args[at + 1].split(","))
        unknown = set(families) - set(DENSE) - set(LATER)
        if unknown:
            sys.exit(f"unknown families {sorted(unknown)}; drawn: {', '.join(DENSE + LATER)}")
        args = args[:at] + args[at + 2:]
    run(sys.argv[1], [(None if s == "none" else int(s), int(n))
                      for s, n in zip(args[::2], args[1::2])], families, steps)
