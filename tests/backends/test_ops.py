"""Backend ops against plain references, and backend selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafit.backends import choose_auto, get_backend
from lorafit.core.errors import LorafitError


def test_fused_linear_cross_entropy_matches_plain(backend):
    rng = np.random.default_rng(0)
    N, C, V = 37, 16, 50
    h = rng.normal(size=(N, C)).astype(np.float32)
    w = rng.normal(size=(V, C)).astype(np.float32)
    t = rng.integers(0, V, N)
    m = (rng.random(N) > 0.3).astype(np.float32)
    m[:3] = 1
    h[:3] *= 40  # targets far below float32's normal range: a loss of hundreds of nats
    t[:3] = (h[:3] @ w.T).argmin(1)

    # reference: torch autograd over the full logits
    ht = torch.tensor(h, requires_grad=True)
    losses = torch.nn.functional.cross_entropy(ht @ torch.tensor(w).T, torch.tensor(t),
                                               reduction="none")
    ref = (losses * torch.tensor(m)).sum()
    ref.backward(retain_graph=True)

    B = backend
    wb, tb, mb = B.from_numpy(w), B.from_numpy(t), B.from_numpy(m)

    def f(tr, _):
        s, n = B.linear_cross_entropy(tr["h"], wb, tb, mb, chunk_rows=8)  # 5 chunks
        return s, n
    (s, n), g = B.value_and_grad(f)({"h": B.from_numpy(h)}, None)
    assert B.to_float(s) == pytest.approx(float(ref), rel=1e-5)
    assert B.to_float(n) == m.sum()
    np.testing.assert_allclose(B.to_numpy(g["h"]), ht.grad.numpy(), rtol=1e-4, atol=1e-6)
    # and the plain op agrees too
    s2, _ = B.cross_entropy(B.linear(B.from_numpy(h), wb), tb, mb)
    assert B.to_float(s2) == pytest.approx(float(ref), rel=1e-5)
    # per_token: the masked token losses, each with its own cotangent (DPO's rows)
    c = rng.normal(size=N).astype(np.float32)
    ht.grad = None
    (losses * torch.tensor(m) * torch.tensor(c)).sum().backward()

    def weighted(tr, _):
        tok, _ = B.linear_cross_entropy(tr["h"], wb, tb, mb, chunk_rows=8, per_token=True)
        return (tok * B.from_numpy(c)).sum(), tok
    (_, tok), g = B.value_and_grad(weighted)({"h": B.from_numpy(h)}, None)
    np.testing.assert_allclose(B.to_numpy(tok), (losses * torch.tensor(m)).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(B.to_numpy(g["h"]), ht.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_packed_attention_stays_inside_each_segment(backend):
    """With segment ids, a token never sees another example: outputs equal separate runs."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(1, 4, 10, 8)).astype(np.float32) for _ in range(3))
    seg = np.array([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]])
    B = backend
    packed = B.to_numpy(B.attention(B.from_numpy(q), B.from_numpy(k[:, :2]),
                                    B.from_numpy(v[:, :2]), 0.3, B.from_numpy(seg)))
    for lo, hi in ((0, 4), (4, 7), (7, 10)):
        alone = B.to_numpy(B.attention(B.from_numpy(q[:, :, lo:hi]),
                                       B.from_numpy(k[:, :2, lo:hi]),
                                       B.from_numpy(v[:, :2, lo:hi]), 0.3))
        np.testing.assert_allclose(packed[:, :, lo:hi], alone, rtol=1e-5, atol=1e-6)


def test_optimizers_follow_the_same_trajectory(torch_backend, mlx_backend):
    rng = np.random.default_rng(0)
    p0 = {"a": rng.normal(size=(3, 4)).astype(np.float32)}
    grads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(5)]
    out = []
    for B in (torch_backend, mlx_backend):
        params = {"a": B.from_numpy(p0["a"])}
        opt = B.make_optimizer(params, weight_decay=0.01)
        for i, g in enumerate(grads):
            opt.step(params, {"a": B.from_numpy(g)}, lr=0.1 / (i + 1), grad_scale=0.5)
        out.append((B.to_numpy(params["a"]), opt.state_to_numpy()))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    assert int(out[0][1]["step"]) == int(out[1][1]["step"]) == 5
    np.testing.assert_allclose(out[0][1]["exp_avg_sq.a"], out[1][1]["exp_avg_sq.a"], rtol=1e-5)


def test_optimizer_state_round_trips_across_backends(torch_backend, mlx_backend):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 3)).astype(np.float32)
    g1, g2 = (rng.normal(size=(2, 3)).astype(np.float32) for _ in range(2))
    pt = {"a": torch_backend.from_numpy(a)}
    ot = torch_backend.make_optimizer(pt)
    ot.step(pt, {"a": torch_backend.from_numpy(g1)}, lr=0.1)
    state = ot.state_to_numpy()
    pm = {"a": mlx_backend.from_numpy(torch_backend.to_numpy(pt["a"]))}
    om = mlx_backend.make_optimizer(pm)
    om.load_state_numpy(state)
    ot.step(pt, {"a": torch_backend.from_numpy(g2)}, lr=0.1)
    om.step(pm, {"a": mlx_backend.from_numpy(g2)}, lr=0.1)
    np.testing.assert_allclose(mlx_backend.to_numpy(pm["a"]), torch_backend.to_numpy(pt["a"]),
                               rtol=1e-6, atol=1e-7)


def test_auto_says_what_it_picked_and_why():
    name, device, reason = choose_auto()
    assert name in ("torch", "mlx") and device and reason


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(LorafitError, match="choose one of"):
        get_backend("jax")


def test_missing_backend_names_the_package(monkeypatch):
    import lorafit.backends as backends

    monkeypatch.setattr(backends, "is_installed", lambda name: name != "mlx")
    with pytest.raises(LorafitError, match=r"pip install .*mlx"):
        get_backend("mlx")


def _reference_attention(q, k, v, scale, seg=None, window=None, softcap=None, sinks=None):
    """Plain numpy attention over float64, the definition the backends must meet."""
    B, Hq, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    k = np.repeat(k, Hq // Hk, axis=1)
    v = np.repeat(v, Hq // Hk, axis=1)
    s = np.einsum("bhtd,bhsd->bhts", q, k).astype(np.float64) * scale
    if softcap is not None:
        s = np.tanh(s / softcap) * softcap
    qi, ki = np.arange(S - T, S)[:, None], np.arange(S)[None]
    mask = np.broadcast_to(ki <= qi, (B, 1, T, S))
    if window is not None:
        mask = mask & (qi - ki < window)
    if seg is not None:
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    s = np.where(mask, s, -np.inf)
    if sinks is not None:
        s = np.concatenate([s, np.broadcast_to(sinks[None, :, None, None], (B, Hq, T, 1))], -1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if sinks is not None:
        p = p[..., :-1]
    return np.einsum("bhts,bhsd->bhtd", p, v)


@pytest.mark.parametrize("variant", [
    dict(), dict(window=3), dict(softcap=2.0), dict(sinks=True), dict(window=4, sinks=True),
    dict(window=3, softcap=1.5, seg=True), dict(cache=True, window=3),
    dict(cache=True, sinks=True)])
def test_attention_variants_match_the_definition(backend, variant):
    rng = np.random.default_rng(1)
    B, Hq, Hk, T, D = 2, 4, 2, 9, 8
    S = T + 5 if variant.get("cache") else T
    q = rng.normal(size=(B, Hq, T, D)).astype(np.float32)
    k = rng.normal(size=(B, Hk, S, D)).astype(np.float32)
    v = rng.normal(size=(B, Hk, S, D)).astype(np.float32)
    seg = np.repeat(np.array([[0] * 4 + [1] * 5]), B, 0).astype(np.int32) \
        if variant.get("seg") else None
    sinks = rng.normal(size=(Hq,)).astype(np.float32) if variant.get("sinks") else None
    kw = dict(window=variant.get("window"), softcap=variant.get("softcap"))
    want = _reference_attention(q, k, v, 0.3, seg, sinks=sinks, **kw)
    ops = backend
    got = ops.attention(ops.from_numpy(q), ops.from_numpy(k), ops.from_numpy(v), 0.3,
                        None if seg is None else ops.from_numpy(seg),
                        sinks=None if sinks is None else ops.from_numpy(sinks), **kw)
    np.testing.assert_allclose(ops.to_numpy(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(), dict(seg=True), dict(window=200)])
def test_mlx_cpu_causal_attention_in_query_blocks_matches_one_call(mlx_backend, variant):
    """Long causal attention on MLX's CPU runs in query blocks (backends/mlx
    _causal_blocks), plain, packed or windowed: its output and the gradients of q, k, v
    equal those of one mx.fast call over the whole square and of the definition (GQA
    heads, a last block shorter than the others, a segment crossing block edges)."""
    import mlx.core as mx

    from lorafit.backends.base import CAUSAL_BLOCKS_FROM

    rng = np.random.default_rng(2)
    B, Hq, Hk, T, D = 1, 4, 2, CAUSAL_BLOCKS_FROM + 88, 8
    q, k, v = (rng.normal(size=(B, h, T, D)).astype(np.float32) for h in (Hq, Hk, Hk))
    cot = mx.array(rng.normal(size=(B, Hq, T, D)).astype(np.float32))
    seg = np.repeat([0, 1, 2], [100, 300, T - 400])[None].astype(np.int32) \
        if variant.get("seg") else None
    window = variant.get("window")
    ops = mlx_backend
    assert ops.device == "cpu"
    segs = None if seg is None else mx.array(seg)

    def vjp(f):
        out, grads = mx.vjp(f, [mx.array(z) for z in (q, k, v)], [cot])
        return [np.array(z) for z in out + grads]

    blocked = vjp(lambda *x: ops.attention(*x, 0.3, segs, window=window))
    mask = "causal" if seg is None and window is None else ops._mask(T, T, segs, window)
    single = vjp(lambda *x: mx.fast.scaled_dot_product_attention(*x, scale=0.3, mask=mask))
    np.testing.assert_allclose(blocked[0], _reference_attention(q, k, v, 0.3, seg, window),
                               rtol=1e-4, atol=1e-5)
    for got, want in zip(blocked, single):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_layer_norm_matches_its_definition(backend):
    rng = np.random.default_rng(0)
    x = rng.normal(2, 3, (2, 5, 16)).astype(np.float32)
    w, b = rng.normal(1, 0.2, 16).astype(np.float32), rng.normal(0, 0.5, 16).astype(np.float32)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    got = backend.to_numpy(backend.layer_norm(*(backend.from_numpy(a) for a in (x, w, b)),
                                              1e-5))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gelu_tanh_matches_torch(backend):
    x = np.linspace(-5, 5, 101).astype(np.float32)
    want = torch.nn.functional.gelu(torch.tensor(x), approximate="tanh").numpy()
    got = backend.to_numpy(backend.gelu_tanh(backend.from_numpy(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- MoE routing and expert ops ---------------------------------------------------------------

def test_softmax_top_k_and_take_along_axis(backend):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(backend.to_numpy(backend.softmax(backend.from_numpy(x))), p,
                               rtol=1e-5, atol=1e-7)
    idx = backend.top_k_indices(backend.from_numpy(x), 3)
    got = np.sort(backend.to_numpy(idx), axis=-1)
    np.testing.assert_array_equal(got, np.sort(np.argsort(-x, axis=-1)[:, :3], axis=-1))
    vals = backend.to_numpy(backend.take_along_axis(backend.from_numpy(x), idx))
    np.testing.assert_allclose(vals, np.take_along_axis(x, backend.to_numpy(idx), -1))


def test_log_softmax_and_exp(backend):
    """float32 log-softmax, stable for large logits (GRPO's per-token log-probs)."""
    x = np.random.default_rng(1).normal(size=(3, 9)).astype(np.float32) * 30
    z = x - x.max(-1, keepdims=True)
    ref = z - np.log(np.exp(z).sum(-1, keepdims=True))
    assert backend.dtype_name(backend.log_softmax(backend.from_numpy(x, "bfloat16"))) == \
        "float32"
    got = backend.to_numpy(backend.log_softmax(backend.from_numpy(x)))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(backend.to_numpy(backend.exp(backend.from_numpy(x / 30))),
                               np.exp(x / 30), rtol=1e-6)


def test_gather_linear_and_its_gradients(backend):
    """x shared by the k choices or one row per choice."""
    rng = np.random.default_rng(1)
    n, k, e, i, o = 6, 2, 4, 5, 3
    w = rng.normal(size=(e, o, i)).astype(np.float32)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    ids = backend.from_numpy(idx)
    c = rng.normal(size=(n, k, o)).astype(np.float32)
    for kx in (1, k):
        x = rng.normal(size=(n, kx, i)).astype(np.float32)
        xb = np.broadcast_to(x, (n, k, i))
        want = np.einsum("nki,nkoi->nko", xb, w[idx])
        got = backend.gather_linear(backend.from_numpy(x), backend.from_numpy(w), ids)
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-5, atol=1e-5)

        # d/dw of sum(y * c) is sum over the rows routed to each expert of c x^T
        def loss(tr, cc):
            y = backend.gather_linear(tr["x"], tr["w"], ids)
            return (y * cc).sum(), None
        (_, _), grads = backend.value_and_grad(loss)(
            {"x": backend.from_numpy(x), "w": backend.from_numpy(w)}, backend.from_numpy(c))
        gw = np.zeros_like(w)
        for a in range(n):
            for b in range(k):
                gw[idx[a, b]] += np.outer(c[a, b], xb[a, b])
        gx = np.einsum("nko,nkoi->nki", c, w[idx]).sum(1, keepdims=True) if kx == 1 \
            else np.einsum("nko,nkoi->nki", c, w[idx])
        np.testing.assert_allclose(backend.to_numpy(grads["w"]), gw, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(backend.to_numpy(grads["x"]), gx, rtol=1e-4, atol=1e-5)


def test_expert_weight_gradient_forms_no_per_row_outer_products(backend):
    """An expert adapter's gradient through grouped_linear (rows in expert order) costs
    about its rows: MLX's gather_mm vjp with unsorted indices formed one (in, out) outer
    product per row before summing them per expert (N*k*in*out floats, 8 MiB here)."""
    rng = np.random.default_rng(2)
    n, k, e, i, o = 256, 2, 4, 64, 64
    x = backend.from_numpy(rng.normal(size=(n, i)).astype(np.float32))
    w = backend.from_numpy(rng.normal(size=(e, o, i)).astype(np.float32))
    ids = backend.from_numpy(rng.integers(0, e, (n, k)))
    c = backend.from_numpy(rng.normal(size=(n, k, o)).astype(np.float32))

    def peak(params):
        def loss(tr, cc):
            groups = backend.expert_groups(ids, e)
            rows = backend.group_rows(tr["x"], groups)
            y = backend.ungroup_rows(backend.grouped_linear(rows, tr.get("w", w), groups),
                                     groups)
            return (y * cc).sum(), None
        step = backend.value_and_grad(loss)
        return backend.measure_peak(lambda: [backend.to_numpy(g) for g in
                                             step(params, c)[1].values()])[1]
    without_w = peak({"x": x})
    with_w = peak({"x": x, "w": w})
    assert with_w - without_w < n * k * i * o * 4 / 8, (with_w, without_w)


def test_grouped_experts_and_their_gradients(backend):
    # rows sorted by expert once, projected (weight and bias), put back in token order;
    # an expert no token chose (3 of 5) is skipped
    rng = np.random.default_rng(2)
    n, k, e, i, o = 7, 2, 5, 4, 8  # row sizes of 16 bytes: torch's grouped_mm runs
    x = rng.normal(size=(n, i)).astype(np.float32)
    w = rng.normal(size=(e, o, i)).astype(np.float32)
    bias = rng.normal(size=(e, o)).astype(np.float32)
    idx = np.stack([rng.choice([0, 1, 2, 4], k, replace=False) for _ in range(n)])
    c = rng.normal(size=(n, k, o)).astype(np.float32)
    ids = backend.from_numpy(idx)

    def loss(tr, cc):
        groups = backend.expert_groups(ids, e)
        rows = backend.group_rows(tr["x"], groups)
        y = backend.ungroup_rows(backend.grouped_linear(rows, tr["w"], groups, tr["b"]), groups)
        return (y * cc).sum(), y
    (_, y), grads = backend.value_and_grad(loss)(
        {"x": backend.from_numpy(x), "w": backend.from_numpy(w), "b": backend.from_numpy(bias)},
        backend.from_numpy(c))
    want = np.einsum("ni,nkoi->nko", x, w[idx]) + bias[idx]
    np.testing.assert_allclose(backend.to_numpy(y), want, rtol=1e-5, atol=1e-5)
    gw, gb = np.zeros_like(w), np.zeros_like(bias)
    for a in range(n):
        for b in range(k):
            gw[idx[a, b]] += np.outer(c[a, b], x[a])
            gb[idx[a, b]] += c[a, b]
    np.testing.assert_allclose(backend.to_numpy(grads["w"]), gw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(backend.to_numpy(grads["b"]), gb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(backend.to_numpy(grads["x"]),
                               np.einsum("nko,nkoi->ni", c, w[idx]), rtol=1e-4, atol=1e-5)


def test_torch_grouped_linear_loop_equals_grouped_mm(monkeypatch):
    # devices without the grouped_mm kernel run one matmul per expert: the same products
    import torch

    import lorafit.backends.torch as tb
    from lorafit.backends import get_backend

    ops = get_backend("torch", "cpu")
    rng = np.random.default_rng(3)
    idx = torch.from_numpy(rng.integers(0, 4, (9, 2)))
    x = torch.from_numpy(rng.normal(size=(9, 8)).astype(np.float32))
    w = torch.from_numpy(rng.normal(size=(4, 12, 8)).astype(np.float32))

    def run():
        g = ops.expert_groups(idx, 4)
        return ops.ungroup_rows(ops.grouped_linear(ops.group_rows(x, g), w, g), g)
    if tb._torch_version() >= (2, 11):
        assert tb._grouped_mm_fits(x, w)
    fused = run()
    monkeypatch.setattr(tb, "_grouped_mm_fits", lambda x, w: False)
    torch.testing.assert_close(run(), fused, rtol=1e-6, atol=1e-6)


def test_clip(backend):
    x = np.linspace(-3, 3, 13).astype(np.float32)
    for lo, hi in ((-1.0, 2.0), (None, 0.5), (-0.5, None)):
        got = backend.to_numpy(backend.clip(backend.from_numpy(x), lo, hi))
        np.testing.assert_array_equal(got, np.clip(x, lo, hi))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_linear_cross_entropy_with_softcap_matches_autograd(backend, dtype):
    """Gemma's final-logit soft-capping inside the fused loss: value and dL/dh equal torch
    autograd through cap * tanh(z / cap) on the full logits."""
    rng = np.random.default_rng(3)
    N, C, V, cap = 29, 16, 50, 2.5
    h = rng.normal(size=(N, C)).astype(np.float32)
    w = rng.normal(size=(V, C)).astype(np.float32)
    t = rng.integers(0, V, N)
    m = (rng.random(N) > 0.3).astype(np.float32)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ht = torch.tensor(h).to(tdt).requires_grad_(True)
    z = (ht @ torch.tensor(w).to(tdt).T).float()
    losses = torch.nn.functional.cross_entropy(torch.tanh(z / cap) * cap, torch.tensor(t),
                                               reduction="none")
    ref = (losses * torch.tensor(m)).sum()
    ref.backward()

    B = backend
    wb, tb, mb = B.from_numpy(w, dtype), B.from_numpy(t), B.from_numpy(m)

    def f(tr, _):
        return B.linear_cross_entropy(tr["h"], wb, tb, mb, chunk_rows=8, softcap=cap)
    (s, n), g = B.value_and_grad(f)({"h": B.from_numpy(h, dtype)}, None)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert B.to_float(s) == pytest.approx(float(ref), rel=tol)
    np.testing.assert_allclose(B.to_numpy(g["h"]), ht.grad.float().numpy(), rtol=tol * 10,
                               atol=tol)
    # the plain path: softcap op, then cross_entropy
    s2, _ = B.cross_entropy(B.softcap(B.linear(B.from_numpy(h), B.from_numpy(w)), cap), tb, mb)
    ref32 = torch.nn.functional.cross_entropy(
        torch.tanh(torch.tensor(h) @ torch.tensor(w).T / cap) * cap, torch.tensor(t),
        reduction="none")
    assert B.to_float(s2) == pytest.approx(float((ref32 * torch.tensor(m)).sum()), rel=1e-5)
def _reference_gated_delta(q, k, v, a, b, a_log, dt_bias, state=None, seg=None):
    """The gated delta rule step by step (torch float64 autograd): the definition."""
    q, k, v, a, b, a_log, dt_bias = (torch.as_tensor(x).double() for x in
                                     (q, k, v, a, b, a_log, dt_bias))
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    q, k = (z / torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-6) for z in (q, k))
    q = q * Dk ** -0.5
    q, k = (z.repeat_interleave(Hv // Hk, dim=2) for z in (q, k))
    beta = torch.sigmoid(b)
    g = -torch.exp(a_log) * torch.nn.functional.softplus(a + dt_bias)
    S = torch.zeros(B, Hv, Dk, Dv, dtype=torch.float64) if state is None \
        else torch.as_tensor(state).double()
    outs = []
    for t in range(T):
        if seg is not None and t > 0:
            S = S * torch.as_tensor(seg[:, t] == seg[:, t - 1]).double()[:, None, None, None]
        S = S * torch.exp(g[:, t])[..., None, None]
        mem = torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        delta = (v[:, t] - mem) * beta[:, t, :, None]
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, 1), S


def _delta_inputs(T, seed=0, B=2, Hk=2, Hv=4, Dk=8, Dv=6):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return dict(q=f(B, T, Hk, Dk), k=f(B, T, Hk, Dk), v=f(B, T, Hv, Dv), a=f(B, T, Hv),
                b=f(B, T, Hv), a_log=(f(Hv) * 0.5).astype(np.float32), dt_bias=f(Hv))


@pytest.mark.parametrize("T", [1, 5, 70, 150])  # one step, one chunk, across chunks of 64
def test_gated_delta_rule_matches_the_recurrence(backend, T):
    ops = backend
    x = _delta_inputs(T)
    state = np.random.default_rng(3).normal(size=(2, 4, 8, 6)).astype(np.float32)
    want_o, want_s = _reference_gated_delta(**x, state=state)
    o, s = ops.gated_delta_rule(**{n: ops.from_numpy(v) for n, v in x.items()},
                                state=ops.from_numpy(state))
    np.testing.assert_allclose(ops.to_numpy(o), want_o.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ops.to_numpy(s), want_s.numpy(), rtol=1e-4, atol=1e-5)


def test_gated_delta_rule_restarts_at_each_packed_example_and_differentiates(backend):
    ops = backend
    T = 150
    x = _delta_inputs(T, seed=1)
    seg = np.zeros((2, T), np.int32)
    seg[0, 40:], seg[0, 64:], seg[0, 130:] = 1, 2, 3  # a boundary on a chunk edge
    seg[1, 100:] = 1
    r = np.random.default_rng(2).normal(size=(2, T, 4, 6))
    leaves = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in x.items()}
    want, _ = _reference_gated_delta(**leaves, seg=seg)
    (want * torch.tensor(r)).sum().backward()

    names = list(x)

    def f(tr, _):
        o, _ = ops.gated_delta_rule(**tr, segment_ids=ops.from_numpy(seg))
        return (o * ops.from_numpy(r.astype(np.float32))).sum(), o
    (_, o), grads = ops.value_and_grad(f)({n: ops.from_numpy(x[n]) for n in names}, None)
    np.testing.assert_allclose(ops.to_numpy(o), want.detach().numpy(), rtol=1e-4, atol=1e-5)
    for n in names:
        np.testing.assert_allclose(ops.to_numpy(grads[n]), leaves[n].grad.numpy(),
                                   rtol=1e-3, atol=1e-4, err_msg=n)


def test_causal_conv1d_matches_the_definition_with_state_and_segments(backend):
    ops = backend
    rng = np.random.default_rng(0)
    B, T, Ch, K = 2, 9, 5, 4
    x = rng.normal(size=(B, T, Ch)).astype(np.float32)
    w = rng.normal(size=(Ch, K)).astype(np.float32)
    state = rng.normal(size=(B, K - 1, Ch)).astype(np.float32)
    xs = np.concatenate([state, x], 1)
    want = sum(xs[:, j:j + T] * w[:, j] for j in range(K))
    y, s = ops.causal_conv1d(ops.from_numpy(x), ops.from_numpy(w), ops.from_numpy(state))
    np.testing.assert_allclose(ops.to_numpy(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.to_numpy(s), xs[:, -(K - 1):])
    seg = np.array([[0] * 4 + [1] * 5, [0] * 9], np.int32)
    y, _ = ops.causal_conv1d(ops.from_numpy(x), ops.from_numpy(w),
                             segment_ids=ops.from_numpy(seg))
    for bi, lo, hi in ((0, 0, 4), (0, 4, 9), (1, 0, 9)):
        alone, _ = ops.causal_conv1d(ops.from_numpy(x[bi:bi + 1, lo:hi]), ops.from_numpy(w))
        np.testing.assert_allclose(ops.to_numpy(y)[bi:bi + 1, lo:hi], ops.to_numpy(alone),
                                   rtol=1e-5, atol=1e-5)


def test_write_rows_and_attention_over_rows_of_different_lengths(backend):
    """The engine's cache ops: rows written at their own positions; attention with lengths
    equals each row's attention over its own unpadded keys."""
    ops = backend
    buf = ops.zeros((3, 2, 6, 4))
    vals = np.arange(2 * 2 * 2 * 4, dtype=np.float32).reshape(2, 2, 2, 4)
    buf = ops.write_rows(buf, ops.from_numpy(np.array([2, 0])), ops.from_numpy(np.array([1, 3])),
                         ops.from_numpy(vals))
    ref = np.zeros((3, 2, 6, 4), np.float32)
    ref[2, :, 1:3], ref[0, :, 3:5] = vals[0], vals[1]
    assert np.array_equal(ops.to_numpy(buf), ref)
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((2, 2, 7, 8)).astype(np.float32) for _ in range(2))
    lens = np.array([3, 7])
    for t, kw in ((1, {}), (1, {"window": 2}), (1, {"softcap": 5.0}), (3, {})):
        q = rng.standard_normal((2, 4, t, 8)).astype(np.float32)
        out = ops.to_numpy(ops.attention(ops.from_numpy(q), ops.from_numpy(k), ops.from_numpy(v),
                                         0.3, lengths=ops.from_numpy(lens), **kw))
        for b in range(2):
            one = ops.attention(ops.from_numpy(q[b:b + 1]), ops.from_numpy(k[b:b + 1, :, :lens[b]]),
                                ops.from_numpy(v[b:b + 1, :, :lens[b]]), 0.3, **kw)
            np.testing.assert_allclose(out[b:b + 1], ops.to_numpy(one), atol=1e-5)


def _packed_rows(lengths_per_row, T):
    """(B, T) segment ids: the given example lengths one after another, the rest padding."""
    seg = np.zeros((len(lengths_per_row), T), np.int32)
    for r, lengths in enumerate(lengths_per_row):
        at = 0
        for s, n in enumerate(lengths):
            seg[r, at:at + n] = s
            at += n
        seg[r, at:] = len(lengths)
    return seg


@pytest.mark.parametrize("variant", [dict(), dict(window=4), dict(window=6, sinks=True),
                                     dict(softcap=2.0)])
def test_packed_attention_without_a_mask_matches_the_definition_and_its_gradients(
        torch_backend, variant):
    """torch's packed path gathers examples into rows of their own (no (B, T, T) mask):
    outputs meet the definition, and gradients those of dense masked attention."""
    rng = np.random.default_rng(3)
    B, Hq, Hk, T, D = 2, 4, 2, 40, 8
    seg = _packed_rows([[3, 17, 9, 1], [40]], T)  # mixed lengths, padding, a full row
    q = rng.normal(size=(B, Hq, T, D)).astype(np.float32)
    k, v = (rng.normal(size=(B, Hk, T, D)).astype(np.float32) for _ in range(2))
    sinks = rng.normal(size=(Hq,)).astype(np.float32) if variant.get("sinks") else None
    kw = dict(window=variant.get("window"), softcap=variant.get("softcap"))
    want = _reference_attention(q, k, v, 0.3, seg, sinks=sinks, **kw)
    ops = torch_backend
    leaves = {n: torch.tensor(a, requires_grad=True) for n, a in dict(q=q, k=k, v=v).items()}
    sink_t = None if sinks is None else torch.tensor(sinks)
    got = ops.attention(leaves["q"], leaves["k"], leaves["v"], 0.3, torch.tensor(seg),
                        sinks=sink_t, **kw)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-5)
    up = torch.tensor(rng.normal(size=got.shape).astype(np.float32))
    grads = torch.autograd.grad((got * up).sum(), list(leaves.values()))
    # the dense reference: every score formed, the (B, 1, T, T) mask applied
    ref = {n: t.detach().clone().requires_grad_(True) for n, t in leaves.items()}
    dense = ops._eager_attention(ref["q"], ref["k"], ref["v"], 0.3, torch.tensor(seg),
                                 kw["window"], kw["softcap"], sink_t)
    ref_grads = torch.autograd.grad((dense * up).sum(), list(ref.values()))
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-4, atol=1e-5)


def test_packed_attention_allocates_no_dense_mask(torch_backend):
    """Forward and backward over packed rows cost about what one causal attention over the
    same shapes costs; the masked path adds at least one (B, T, T) boolean mask."""
    ops = torch_backend
    rng = np.random.default_rng(0)
    B, H, T, D = 2, 2, 1024, 8
    seg = torch.tensor(_packed_rows([[150, 350, 250, 200], [512, 500]], T))
    q, k, v = (torch.tensor(rng.normal(size=(B, H, T, D)).astype(np.float32),
                            requires_grad=True) for _ in range(3))
    mask_bytes = B * T * T

    def peak(attend):
        def run():
            o = attend()
            return torch.autograd.grad(o.square().sum(), (q, k, v))
        return ops.measure_peak(run)[1]

    # the fused kernel's causal path, as packed examples take (unpacked rows of 1024 tokens
    # would run in query blocks and keep their probabilities: backends/torch/causal_blocks)
    plain = peak(lambda: ops.attention(q, k, v, 0.3, blocks=False))
    packed = peak(lambda: ops.attention(q, k, v, 0.3, seg))
    masked = peak(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=ops._mask(T, T, seg, None, q.device), scale=0.3))
    assert masked - plain > mask_bytes  # the measure sees a dense mask where there is one
    assert packed - plain < mask_bytes / 8, (packed, plain, mask_bytes)


def test_fused_linear_cross_entropy_holds_a_few_chunks_not_all_logits(backend):
    """The step's peak is a few chunks' logits, not the whole (N, V): on MLX the lazy graph
    would otherwise hold every chunk at once (backends/mlx linear_cross_entropy)."""
    rng = np.random.default_rng(0)
    N, C, V, rows = 512, 32, 4096, 32  # all logits 8 MiB, one chunk 0.5 MiB
    B = backend
    h = B.from_numpy(rng.normal(size=(N, C)).astype(np.float32))
    wb = B.from_numpy((rng.normal(size=(V, C)) * 0.1).astype(np.float32))
    tb, mb = B.from_numpy(rng.integers(0, V, N)), B.from_numpy(np.ones(N, np.float32))
    step = B.compile(B.value_and_grad(
        lambda tr, _: B.linear_cross_entropy(tr["h"], wb, tb, mb, chunk_rows=rows)))
    B.materialize(step({"h": h}, None))  # compile outside the measure
    out, peak = B.measure_peak(lambda: B.materialize(step({"h": h}, None)))
    inputs = (N * C + V * C) * 4
    assert peak - inputs < N * V * 4  # all rows: logits and their exp, 2 * N * V * 4


def test_lora_linear_equals_the_two_linears_composed(backend):
    """The fused base + LoRA op (torch: one output buffer, addmm into it) gives the values
    and the gradients (x, bias, A, B) of linear(x, W, b) + linear(linear(x, A) * s, B)."""
    rng = np.random.default_rng(3)
    x, w, b, a, bb = (rng.normal(size=s).astype(np.float32)
                      for s in ((2, 5, 12), (9, 12), (9,), (4, 12), (9, 4)))
    B = backend
    wb, cot = B.from_numpy(w), B.from_numpy(rng.normal(size=(2, 5, 9)).astype(np.float32))

    def fused(tr, _):
        y = B.lora_linear(tr["x"], wb, tr["b"], tr["a"], tr["bb"], 0.5)
        return (y * cot).sum(), y

    def composed(tr, _):
        y = B.linear(tr["x"], wb, tr["b"]) + B.linear(B.linear(tr["x"], tr["a"]) * 0.5, tr["bb"])
        return (y * cot).sum(), y

    leaves = {k: B.from_numpy(v) for k, v in dict(x=x, b=b, a=a, bb=bb).items()}
    (_, y1), g1 = B.value_and_grad(fused)(leaves, None)
    (_, y2), g2 = B.value_and_grad(composed)(leaves, None)
    np.testing.assert_allclose(B.to_numpy(y1), B.to_numpy(y2), rtol=1e-5, atol=1e-5)
    for k in leaves:
        np.testing.assert_allclose(B.to_numpy(g1[k]), B.to_numpy(g2[k]), rtol=1e-5, atol=1e-5)
    # a frozen input (the first layer's): no gradient for it, the adapter's still formed
    (_, y3), g3 = B.value_and_grad(lambda tr, _: fused({**tr, "x": leaves["x"]}, None))(
        {k: v for k, v in leaves.items() if k != "x"}, None)
    np.testing.assert_allclose(B.to_numpy(g3["a"]), B.to_numpy(g2["a"]), rtol=1e-5, atol=1e-5)


def test_lora_linears_equal_one_lora_linear_per_projection(backend):
    """The grouped op (q, k, v of one input; torch: one thin matmul over the concatenated
    A's) gives the values and gradients (x, biases, each A and B) of one lora_linear per
    projection; ranks and widths differ, one projection has a (frozen) bias."""
    rng = np.random.default_rng(5)
    B = backend
    shapes = [(9, 4, True), (6, 2, False), (6, 3, False)]  # out, r, bias
    leaves = {"x": rng.normal(size=(2, 5, 12)).astype(np.float32)}
    frozen, biases, cots = [], [], []
    for j, (out, r, has_bias) in enumerate(shapes):
        frozen.append(B.from_numpy(rng.normal(size=(out, 12)).astype(np.float32)))
        leaves[f"a{j}"] = rng.normal(size=(r, 12)).astype(np.float32)
        leaves[f"b{j}"] = rng.normal(size=(out, r)).astype(np.float32)
        biases.append(B.from_numpy(rng.normal(size=(out,)).astype(np.float32))
                      if has_bias else None)
        cots.append(B.from_numpy(rng.normal(size=(2, 5, out)).astype(np.float32)))
    leaves = {k: B.from_numpy(v) for k, v in leaves.items()}

    def projections(tr):
        return [(w, bias, tr[f"a{j}"], tr[f"b{j}"])
                for j, (w, bias) in enumerate(zip(frozen, biases))]

    def loss(ys):
        return sum((y * c).sum() for y, c in zip(ys, cots)), ys

    def grouped(tr, _):
        return loss(B.lora_linears(tr["x"], projections(tr), 0.5))

    def separate(tr, _):
        return loss([B.lora_linear(tr["x"], *p, 0.5) for p in projections(tr)])

    (_, ys1), g1 = B.value_and_grad(grouped)(leaves, None)
    (_, ys2), g2 = B.value_and_grad(separate)(leaves, None)
    for y1, y2 in zip(ys1, ys2):
        np.testing.assert_allclose(B.to_numpy(y1), B.to_numpy(y2), rtol=1e-5, atol=1e-5)
    for k in leaves:
        np.testing.assert_allclose(B.to_numpy(g1[k]), B.to_numpy(g2[k]), rtol=1e-5, atol=1e-5)
    # a frozen input (the first layer's): no gradient for it, the adapters' still formed
    _, g3 = B.value_and_grad(lambda tr, _: grouped({**tr, "x": leaves["x"]}, None))(
        {k: v for k, v in leaves.items() if k != "x"}, None)
    for k in g3:
        np.testing.assert_allclose(B.to_numpy(g3[k]), B.to_numpy(g2[k]), rtol=1e-5, atol=1e-5)


def test_apply_rope_and_its_gradient_match_the_definition(backend):
    """x * cos + rotate_half(x) * sin, values and dL/dx (torch runs it as two passes)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)
    ang = rng.normal(size=(2, 1, 5, 8)).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)  # halves unlike each other: no table layout assumed
    cot = rng.normal(size=x.shape).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    ref = xt * torch.tensor(cos) + torch.cat([-xt[..., 4:], xt[..., :4]], -1) * torch.tensor(sin)
    (ref * torch.tensor(cot)).sum().backward()
    B = backend
    c, s, ct = B.from_numpy(cos), B.from_numpy(sin), B.from_numpy(cot)

    def f(tr, _):
        y = B.apply_rope(tr["x"], c, s)
        return (y * ct).sum(), y
    (_, y), g = B.value_and_grad(f)({"x": B.from_numpy(x)}, None)
    np.testing.assert_allclose(B.to_numpy(y), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(B.to_numpy(g["x"]), xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_rms_norm_and_its_gradient_match_the_definition(backend):
    """x * rsqrt(mean(x^2) + eps) * w, values and dL/dx (torch: its own backward)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4, 16)).astype(np.float32)
    w, cot = rng.normal(size=16).astype(np.float32), rng.normal(size=x.shape).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    ref = xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.tensor(w)
    (ref * torch.tensor(cot)).sum().backward()
    B = backend
    wb, ct = B.from_numpy(w), B.from_numpy(cot)

    def f(tr, _):
        y = B.rms_norm(tr["x"], wb, 1e-5)
        return (y * ct).sum(), y
    (_, y), g = B.value_and_grad(f)({"x": B.from_numpy(x)}, None)
    np.testing.assert_allclose(B.to_numpy(y), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(B.to_numpy(g["x"]), xt.grad.numpy(), rtol=1e-4, atol=1e-5)
