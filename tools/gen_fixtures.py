#!/usr/bin/env python3
"""Generate the reference fixtures that the Rust tests of `lego` compare against.

What it does
------------
Every differentiable op of the crate is re-implemented here, by hand, in `jax.numpy`, in
float64. For each test case the script

1. draws the inputs as float32 from `numpy.random.default_rng(seed)`, where the seed is
   fixed per case (`zlib.crc32` of the case path, e.g. "ops/matmul_2d");
2. computes the forward output `out` in float64 from those float32 values;
3. draws a random upstream gradient `dout` (float32, standard normal, shape of `out`);
4. computes, with `jax.vjp`, the vector-Jacobian product of `dout` with respect to every
   differentiable input, i.e. the gradient of `sum(out * dout)`: `grad_<input>`;
5. stores everything as float32 in `tests/fixtures/<group>/<case>.safetensors`.

Besides the `ops` group it writes an AdamW trajectory and a gradient-clipping case
(`optim`), and a whole 2-layer Llama-style model with its loss and all parameter gradients
(`model`). It also writes `tests/fixtures/README.md`, which lists every file with its
tensors and metadata, so the listing can never drift from the data.

The ops are written out explicitly (RoPE, attention, softmax, RMSNorm, cross-entropy ...)
instead of calling a library function whose convention might differ from ours. JAX is
only used for what it is trusted for: float64 arithmetic and automatic differentiation.

File format
-----------
* All tensors are float32, row-major. Integer data (token ids, targets) is stored as
  float32 holding exact integers.
* Scalars (a loss, `sum_all`, `mean_all`, their `dout`, a gradient norm) are stored with
  shape [1], not [] (a rank-0 tensor is awkward for many loaders).
* Scalar parameters of an op (eps, axis, offset, ...) are in the safetensors metadata, as
  strings: floats in Python `repr` form ("1e-05", "-0.7"), integers in decimal ("3"), lists
  as comma-separated integers ("0,2,1,3").

Run it
------
    pip install jax numpy safetensors
    python3 tools/gen_fixtures.py

(from the crate root; the output is deterministic: running it twice gives byte-identical
files.)
"""

import json
import os
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

jax.config.update("jax_enable_x64", True)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

# ---------------------------------------------------------------------------------------------
# Reference definitions of the ops (float64, jax.numpy, written out by hand)
# ---------------------------------------------------------------------------------------------


def sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def silu(x):
    """silu(x) = x * sigmoid(x)."""
    return x * sigmoid(x)


def relu(x):
    return jnp.where(x > 0, x, 0.0)


def softmax(x):
    """Softmax over the last dim. Subtracting the max changes nothing mathematically; it is
    held constant (stop_gradient) so that autodiff does not route gradient through it."""
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    e = jnp.exp(x - m)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def log_softmax(x):
    """log_softmax(x) = x - log(sum(exp(x))) over the last dim (max-shifted, see softmax)."""
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return x - m - jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True))


def rmsnorm(x, weight, eps):
    """out = x / sqrt(mean(x^2 over the last dim) + eps) * weight."""
    ms = jnp.mean(x * x, axis=-1, keepdims=True)
    return x / jnp.sqrt(ms + eps) * weight


def rope(x, offset, theta):
    """Rotary position embedding, interleaved-pair convention (llama2.c / Meta's Llama).

    x has layout (batch, seq, heads, head_dim). The token at sequence index t has position
    p = offset + t. For pair j in 0..head_dim/2, with angle = p * theta^(-2j/head_dim):
        (x[2j], x[2j+1]) -> (x[2j] cos - x[2j+1] sin,  x[2j] sin + x[2j+1] cos)
    (NOT the "rotate-half" convention that pairs x[j] with x[j + head_dim/2].)
    """
    _, T, _, hd = x.shape
    pos = offset + jnp.arange(T, dtype=jnp.float64)  # (T,)
    j = jnp.arange(hd // 2, dtype=jnp.float64)  # (hd/2,)
    freq = theta ** (-2.0 * j / hd)  # (hd/2,)
    angle = pos[:, None] * freq[None, :]  # (T, hd/2)
    cos = jnp.cos(angle)[None, :, None, :]  # broadcast over batch and heads
    sin = jnp.sin(angle)[None, :, None, :]
    x_even = x[..., 0::2]  # x[2j]
    x_odd = x[..., 1::2]  # x[2j+1]
    y_even = x_even * cos - x_odd * sin
    y_odd = x_even * sin + x_odd * cos
    return jnp.stack([y_even, y_odd], axis=-1).reshape(x.shape)  # re-interleave


def attention(q, k, v):
    """Causal scaled-dot-product attention with a cached prefix.

    Layout (batch, seq, heads, head_dim); q has Tq positions, k and v have Tk >= Tq. The
    first P = Tk - Tq key positions are a cached prefix, so query i (0-based within q) sits
    at absolute position P + i and attends to key positions j <= P + i:
        scores_j = q_i . k_j / sqrt(head_dim)
        p = softmax(scores over the allowed j)
        out_i = sum_j p_j v_j
    Written as a loop over queries, each seeing only its allowed keys (no mask needed).
    """
    _, Tq, _, hd = q.shape
    Tk = k.shape[1]
    P = Tk - Tq
    scale = 1.0 / np.sqrt(hd)
    rows = []
    for i in range(Tq):
        n = P + i + 1  # number of keys query i may see
        scores = jnp.einsum("bhd,bjhd->bhj", q[:, i], k[:, :n]) * scale
        p = softmax(scores)  # (B, H, n)
        rows.append(jnp.einsum("bhj,bjhd->bhd", p, v[:, :n]))
    return jnp.stack(rows, axis=1)  # (B, Tq, H, hd)


def attention_masked(q, k, v, visible):
    """Causal attention in which query i of batch row b sees key j < P + i only if
    visible[b, j], and always its own key P + i (TRUE early exit's Skip fill: a token that
    exited is missing from the upper layers' cache). Written per batch row and query, each
    seeing only the keys it may (no mask needed)."""
    B, Tq, _, hd = q.shape
    Tk = k.shape[1]
    P = Tk - Tq
    scale = 1.0 / np.sqrt(hd)
    out = []
    for b in range(B):
        rows = []
        for i in range(Tq):
            seen = [j for j in range(P + i) if visible[b, j]] + [P + i]
            scores = jnp.einsum("hd,jhd->hj", q[b, i], k[b, seen]) * scale
            p = softmax(scores)  # (H, len(seen))
            rows.append(jnp.einsum("hj,jhd->hd", p, v[b, seen]))
        out.append(jnp.stack(rows, axis=0))  # (Tq, H, hd)
    return jnp.stack(out, axis=0)  # (B, Tq, H, hd)


def cross_entropy(logits, targets, weights=None):
    """logits (N, C), integer targets (N,). nll_i = -log_softmax(logits_i)[targets_i].
    Unweighted: mean_i nll_i. Weighted: sum_i w_i nll_i / sum_i w_i."""
    nll = -log_softmax(logits)[jnp.arange(logits.shape[0]), targets]
    if weights is None:
        return jnp.mean(nll)
    return jnp.sum(weights * nll) / jnp.sum(weights)


# ---------------------------------------------------------------------------------------------
# Drawing inputs, differentiating, saving
# ---------------------------------------------------------------------------------------------


def normal(rng, shape, std=1.0):
    return (std * rng.standard_normal(shape)).astype(np.float32)


def uniform(rng, shape, lo, hi):
    return rng.uniform(lo, hi, shape).astype(np.float32)


def signed_uniform(rng, shape, lo, hi):
    """Random sign times uniform(lo, hi): keeps |x| >= lo (away from a singularity/kink)."""
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return (sign * rng.uniform(lo, hi, shape)).astype(np.float32)


def vjp_fixture(rng, fn, **inputs):
    """Forward and backward of `fn` at the given float32 inputs, all of them differentiated.

    Anything not to be differentiated (ids, targets, weights, constants) is captured by `fn`
    itself. Returns the inputs, `out`, a random `dout` and one `grad_<name>` per input.
    """
    names = list(inputs)
    args = [jnp.asarray(inputs[n], dtype=jnp.float64) for n in names]
    out, pullback = jax.vjp(fn, *args)
    dout = normal(rng, out.shape)
    grads = pullback(jnp.asarray(dout, dtype=jnp.float64))
    tensors = dict(inputs)
    tensors["out"] = out
    tensors["dout"] = dout
    for n, g in zip(names, grads):
        tensors["grad_" + n] = g
    return tensors


def canonical_header(data):
    """safetensors writes the metadata from a Rust HashMap, whose key order changes from
    run to run. Rewrite the JSON header with the metadata keys sorted (same length, same
    layout) so that the files are byte-for-byte reproducible."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])  # dict keeps the file's key order
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new.rstrip()) == len(data[8 : 8 + n].rstrip()), "header layout changed"
    return data[:8] + new.ljust(n, b" ") + data[8 + n :]


def to_f32(x):
    a = np.asarray(x, dtype=np.float64)
    assert np.all(np.isfinite(a))
    a = a.astype(np.float32)
    return a.reshape(1) if a.ndim == 0 else a  # scalars are stored with shape [1]


def save(group, name, tensors, meta):
    tensors = {k: to_f32(v) for k, v in tensors.items()}
    meta = {k: str(v) for k, v in meta.items()}
    d = os.path.join(ROOT, group)
    os.makedirs(d, exist_ok=True)
    data = safetensors.numpy.save(tensors, metadata=meta or None)
    with open(os.path.join(d, name + ".safetensors"), "wb") as f:
        f.write(canonical_header(data))
    return tensors, meta


CASES = []  # (group, name, function), in registration order


def case(group, name):
    """Register a case. The function takes its rng and returns (tensors, metadata); the
    first line of its docstring is its description in README.md."""

    def register(fn):
        CASES.append((group, name, fn))
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# ops: matmul
# ---------------------------------------------------------------------------------------------


@case("ops", "matmul_2d")
def matmul_2d(rng):
    """out = a @ b; a (5,7), b (7,3)."""
    a, b = normal(rng, (5, 7)), normal(rng, (7, 3))
    return vjp_fixture(rng, lambda a, b: a @ b, a=a, b=b), {}


@case("ops", "matmul_tb")
def matmul_tb(rng):
    """out = a @ b.T; a (5,7), b (3,7)."""
    a, b = normal(rng, (5, 7)), normal(rng, (3, 7))
    return vjp_fixture(rng, lambda a, b: a @ b.T, a=a, b=b), {}


@case("ops", "matmul_ta")
def matmul_ta(rng):
    """out = a.T @ b; a (7,5), b (7,3)."""
    a, b = normal(rng, (7, 5)), normal(rng, (7, 3))
    return vjp_fixture(rng, lambda a, b: a.T @ b, a=a, b=b), {}


@case("ops", "matmul_batched")
def matmul_batched(rng):
    """out[i,j] = a[i,j] @ b[i,j]; a (2,3,5,4), b (2,3,4,6), out (2,3,5,6)."""
    a, b = normal(rng, (2, 3, 5, 4)), normal(rng, (2, 3, 4, 6))
    return vjp_fixture(rng, lambda a, b: jnp.einsum("...ik,...kj->...ij", a, b), a=a, b=b), {}


@case("ops", "matmul_bcast")
def matmul_bcast(rng):
    """out[i] = a[i] @ b, b shared by the batch; a (2,5,7), b (7,3), out (2,5,3)."""
    a, b = normal(rng, (2, 5, 7)), normal(rng, (7, 3))
    return vjp_fixture(rng, lambda a, b: jnp.einsum("bik,kj->bij", a, b), a=a, b=b), {}


# ---------------------------------------------------------------------------------------------
# ops: broadcasting binary ops (numpy broadcasting rules), one case per (op, shape pair)
# ---------------------------------------------------------------------------------------------

BINARY_OPS = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "div": lambda x, y: x / y,
}
BINARY_SHAPES = {
    "same": ((3, 17), (3, 17)),
    "lastdim": ((2, 3, 17), (17,)),
    "leading": ((2, 3, 17), (1, 3, 17)),
    "col": ((2, 3, 17), (3, 1)),
}


def binary_case(op, variant):
    xs, ys = BINARY_SHAPES[variant]

    def make(rng):
        x = normal(rng, xs)
        # for div keep |y| >= 0.5 so the quotient and its gradient stay moderate
        y = signed_uniform(rng, ys, 0.5, 2.0) if op == "div" else normal(rng, ys)
        return vjp_fixture(rng, BINARY_OPS[op], x=x, y=y), {}

    make.__doc__ = f"out = x {op} y with numpy broadcasting; x {xs}, y {ys}."
    return make


for _op in BINARY_OPS:
    for _variant in BINARY_SHAPES:
        case("ops", f"{_op}_{_variant}")(binary_case(_op, _variant))


@case("ops", "add_scalar")
def add_scalar(rng):
    """out = x + scalar; x (3,17), scalar 1.5."""
    s = 1.5
    return vjp_fixture(rng, lambda x: x + s, x=normal(rng, (3, 17))), {"scalar": s}


@case("ops", "mul_scalar")
def mul_scalar(rng):
    """out = x * scalar; x (3,17), scalar -0.7."""
    s = -0.7
    return vjp_fixture(rng, lambda x: x * s, x=normal(rng, (3, 17))), {"scalar": s}


# ---------------------------------------------------------------------------------------------
# ops: unary, all on x (4,9)
# ---------------------------------------------------------------------------------------------


@case("ops", "exp")
def exp_case(rng):
    """out = exp(x); x (4,9) normal."""
    return vjp_fixture(rng, jnp.exp, x=normal(rng, (4, 9))), {}


@case("ops", "log")
def log_case(rng):
    """out = ln(x); x (4,9) uniform(0.1, 3)."""
    return vjp_fixture(rng, jnp.log, x=uniform(rng, (4, 9), 0.1, 3.0)), {}


@case("ops", "silu")
def silu_case(rng):
    """out = x * sigmoid(x) = x / (1 + exp(-x)); x (4,9) normal*2."""
    return vjp_fixture(rng, silu, x=normal(rng, (4, 9), 2.0)), {}


@case("ops", "relu")
def relu_case(rng):
    """out = max(x, 0); x (4,9) with 0.05 <= |x| <= 2 (away from the kink)."""
    return vjp_fixture(rng, relu, x=signed_uniform(rng, (4, 9), 0.05, 2.0)), {}


@case("ops", "tanh")
def tanh_case(rng):
    """out = tanh(x); x (4,9) normal."""
    return vjp_fixture(rng, jnp.tanh, x=normal(rng, (4, 9))), {}


@case("ops", "neg")
def neg_case(rng):
    """out = -x; x (4,9) normal."""
    return vjp_fixture(rng, lambda x: -x, x=normal(rng, (4, 9))), {}


@case("ops", "sqr")
def sqr_case(rng):
    """out = x * x; x (4,9) normal."""
    return vjp_fixture(rng, lambda x: x * x, x=normal(rng, (4, 9))), {}


@case("ops", "sqrt")
def sqrt_case(rng):
    """out = sqrt(x); x (4,9) uniform(0.1, 3)."""
    return vjp_fixture(rng, jnp.sqrt, x=uniform(rng, (4, 9), 0.1, 3.0)), {}


# ---------------------------------------------------------------------------------------------
# ops: reductions, on x (3,5,7)
# ---------------------------------------------------------------------------------------------


@case("ops", "sum_all")
def sum_all(rng):
    """out = sum of all elements (scalar, stored as [1]); x (3,5,7)."""
    return vjp_fixture(rng, jnp.sum, x=normal(rng, (3, 5, 7))), {}


@case("ops", "mean_all")
def mean_all(rng):
    """out = mean of all elements (scalar, stored as [1]); x (3,5,7)."""
    return vjp_fixture(rng, jnp.mean, x=normal(rng, (3, 5, 7))), {}


def reduce_case(reduce, axis):
    def make(rng):
        f = lambda x: reduce(x, axis=axis)  # keepdim false: the axis disappears
        return vjp_fixture(rng, f, x=normal(rng, (3, 5, 7))), {"axis": axis}

    make.__doc__ = f"out = {reduce.__name__} over axis {axis}, keepdim false; x (3,5,7)."
    return make


case("ops", "sum_axis")(reduce_case(jnp.sum, 1))
case("ops", "mean_axis")(reduce_case(jnp.mean, 2))
case("ops", "mean_axis0")(reduce_case(jnp.mean, 0))


# ---------------------------------------------------------------------------------------------
# ops: shape ops
# ---------------------------------------------------------------------------------------------


@case("ops", "permute")
def permute(rng):
    """out = x permuted so that out.shape[i] = x.shape[axes[i]]; x (2,3,4,5), axes 0,2,1,3."""
    axes = (0, 2, 1, 3)
    f = lambda x: jnp.transpose(x, axes)
    return vjp_fixture(rng, f, x=normal(rng, (2, 3, 4, 5))), {"axes": ",".join(map(str, axes))}


@case("ops", "transpose_last2")
def transpose_last2(rng):
    """out = x with its last two dims swapped; x (3,4,5), out (3,5,4)."""
    return vjp_fixture(rng, lambda x: jnp.swapaxes(x, -1, -2), x=normal(rng, (3, 4, 5))), {}


@case("ops", "narrow")
def narrow(rng):
    """out = x[:, start:start+len, :]; x (2,7,5), axis 1, start 2, len 3."""
    axis, start, length = 1, 2, 3
    f = lambda x: x[:, start : start + length, :]
    meta = {"axis": axis, "start": start, "len": length}
    return vjp_fixture(rng, f, x=normal(rng, (2, 7, 5))), meta


@case("ops", "cat")
def cat(rng):
    """out = concatenation of x0 (2,3,5), x1 (2,4,5), x2 (2,1,5) along axis 1 -> (2,8,5)."""
    x0, x1, x2 = normal(rng, (2, 3, 5)), normal(rng, (2, 4, 5)), normal(rng, (2, 1, 5))
    f = lambda x0, x1, x2: jnp.concatenate([x0, x1, x2], axis=1)
    return vjp_fixture(rng, f, x0=x0, x1=x1, x2=x2), {"axis": 1}


# ---------------------------------------------------------------------------------------------
# ops: transformer building blocks
# ---------------------------------------------------------------------------------------------


@case("ops", "embedding")
def embedding(rng):
    """out[b,t] = weight[ids[b,t]]; weight (11,6), ids (2,5) with repeats, out (2,5,6)."""
    weight = normal(rng, (11, 6))
    ids = rng.integers(0, 11, (2, 5))
    ids[1, 3] = ids[0, 1] = ids[1, 0]  # make sure some rows are used 3 times: scatter-ADD
    t = vjp_fixture(rng, lambda weight: weight[ids], weight=weight)
    t["ids"] = ids  # not differentiable
    return t, {}


@case("ops", "rmsnorm")
def rmsnorm_case(rng):
    """out = x / sqrt(mean(x^2, last dim) + eps) * weight; x (3,4,13), weight (13,)."""
    eps = 1e-5
    x = normal(rng, (3, 4, 13))
    weight = (1.0 + 0.2 * normal(rng, (13,))).astype(np.float32)
    t = vjp_fixture(rng, lambda x, weight: rmsnorm(x, weight, eps), x=x, weight=weight)
    return t, {"eps": eps}


@case("ops", "rmsnorm_wide")
def rmsnorm_wide(rng):
    """rmsnorm as above; x (2,67), weight (67,), eps 1e-5."""
    eps = 1e-5
    x = normal(rng, (2, 67))
    weight = (1.0 + 0.2 * normal(rng, (67,))).astype(np.float32)
    t = vjp_fixture(rng, lambda x, weight: rmsnorm(x, weight, eps), x=x, weight=weight)
    return t, {"eps": eps}


@case("ops", "swiglu")
def swiglu(rng):
    """out = silu(a) * b; a, b (3,19)."""
    a, b = normal(rng, (3, 19), 2.0), normal(rng, (3, 19))
    return vjp_fixture(rng, lambda a, b: silu(a) * b, a=a, b=b), {}


@case("ops", "rope")
def rope_case(rng):
    """Interleaved RoPE; x (B=2, T=5, H=3, hd=8), positions offset+t, offset 3, theta 10000."""
    offset, theta = 3, 10000.0
    t = vjp_fixture(rng, lambda x: rope(x, offset, theta), x=normal(rng, (2, 5, 3, 8)))
    return t, {"offset": offset, "theta": theta}


@case("ops", "rope_offset0")
def rope_offset0(rng):
    """Interleaved RoPE; x (1,7,2,6), offset 0, theta 500."""
    offset, theta = 0, 500.0
    t = vjp_fixture(rng, lambda x: rope(x, offset, theta), x=normal(rng, (1, 7, 2, 6)))
    return t, {"offset": offset, "theta": theta}


@case("ops", "softmax")
def softmax_case(rng):
    """out = softmax over the last dim; x (4,13) normal*3."""
    return vjp_fixture(rng, softmax, x=normal(rng, (4, 13), 3.0)), {"axis": -1}


@case("ops", "log_softmax")
def log_softmax_case(rng):
    """out = log_softmax over the last dim; x (4,13) normal*3."""
    return vjp_fixture(rng, log_softmax, x=normal(rng, (4, 13), 3.0)), {"axis": -1}


def attention_case(B, Tq, Tk, H, hd):
    def make(rng):
        q, k, v = normal(rng, (B, Tq, H, hd)), normal(rng, (B, Tk, H, hd)), normal(rng, (B, Tk, H, hd))
        return vjp_fixture(rng, attention, q=q, k=k, v=v), {"prefix": Tk - Tq}

    make.__doc__ = (
        f"Causal attention, query i sees keys j <= P+i; q ({B},{Tq},{H},{hd}), "
        f"k, v ({B},{Tk},{H},{hd}), prefix P = {Tk - Tq}."
    )
    return make


case("ops", "attention")(attention_case(B=2, Tq=4, Tk=6, H=3, hd=8))
case("ops", "attention_noprefix")(attention_case(B=1, Tq=5, Tk=5, H=2, hd=4))
case("ops", "attention_single")(attention_case(B=2, Tq=1, Tk=7, H=2, hd=6))


@case("ops", "attention_masked")
def attention_masked_case(rng):
    """Attention with visible keys: q (2,5,3,4), k, v (2,7,3,4), prefix P = 2, visible (2,7)
    0/1 flags (a query always sees itself)."""
    B, Tq, Tk, H, hd = 2, 5, 7, 3, 4
    q, k, v = normal(rng, (B, Tq, H, hd)), normal(rng, (B, Tk, H, hd)), normal(rng, (B, Tk, H, hd))
    visible = rng.random((B, Tk)) < 0.5
    t = vjp_fixture(rng, lambda q, k, v: attention_masked(q, k, v, visible), q=q, k=k, v=v)
    t["visible"] = visible.astype(np.float64)  # not differentiated
    return t, {"prefix": Tk - Tq}


@case("ops", "cross_entropy")
def cross_entropy_case(rng):
    """out = mean_i -log_softmax(logits_i)[targets_i] (scalar, [1]); logits (6,11), targets (6,)."""
    logits = normal(rng, (6, 11), 2.0)
    targets = rng.integers(0, 11, (6,))
    t = vjp_fixture(rng, lambda logits: cross_entropy(logits, targets), logits=logits)
    t["targets"] = targets
    return t, {}


@case("ops", "cross_entropy_weighted")
def cross_entropy_weighted(rng):
    """out = sum_i w_i nll_i / sum_i w_i (scalar, [1]); logits (7,11), targets (7,), weights (7,) two zeros."""
    logits = normal(rng, (7, 11), 2.0)
    targets = rng.integers(0, 11, (7,))
    weights = uniform(rng, (7,), 0.5, 2.0)
    weights[[1, 4]] = 0.0  # masked-out rows: they must get zero gradient
    f = lambda logits: cross_entropy(logits, targets, jnp.asarray(weights, jnp.float64))
    t = vjp_fixture(rng, f, logits=logits)
    t["targets"] = targets
    t["weights"] = weights  # not differentiated
    return t, {}


# ---------------------------------------------------------------------------------------------
# optim: AdamW and gradient clipping (numpy float64)
# ---------------------------------------------------------------------------------------------


@case("optim", "adamw")
def adamw(rng):
    """Three steps of torch.optim.AdamW on param (37,) with gradients g1, g2, g3 -> after1..3."""
    lr, beta1, beta2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    param = normal(rng, (37,))
    gs = [normal(rng, (37,), s) for s in (1.0, 0.1, 3.0)]  # different scales on purpose
    p = param.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    t = {"param": param, "g1": gs[0], "g2": gs[1], "g3": gs[2]}
    for step, g in enumerate(gs, start=1):
        g = g.astype(np.float64)
        p = p * (1.0 - lr * wd)  # decoupled weight decay, applied first
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        denom = np.sqrt(v) / np.sqrt(bc2) + eps
        p = p - (lr / bc1) * m / denom
        t[f"after{step}"] = p
    meta = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": wd}
    return t, meta


def clip_grad_norm(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_: total_norm = sqrt(sum of all squares);
    every grad is multiplied by min(max_norm / (total_norm + 1e-6), 1)."""
    total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    scale = min(max_norm / (total + 1e-6), 1.0)
    return [g.astype(np.float64) * scale for g in grads], total


@case("optim", "clip")
def clip(rng):
    """clip_grad_norm_ of grads a (5,3), b (7,) to max_norm 0.5 (clipping happens)."""
    max_norm = 0.5
    a, b = normal(rng, (5, 3)), normal(rng, (7,))
    (ca, cb), total = clip_grad_norm([a, b], max_norm)
    return {"a": a, "b": b, "clipped_a": ca, "clipped_b": cb, "total_norm": total}, {"max_norm": max_norm}


@case("optim", "clip_noop")
def clip_noop(rng):
    """As clip, but the total norm is below max_norm 0.5, so the grads are unchanged."""
    max_norm = 0.5
    a, b = normal(rng, (5, 3), 0.05), normal(rng, (7,), 0.05)
    (ca, cb), total = clip_grad_norm([a, b], max_norm)
    assert total < max_norm
    return {"a": a, "b": b, "clipped_a": ca, "clipped_b": cb, "total_norm": total}, {"max_norm": max_norm}


# ---------------------------------------------------------------------------------------------
# model: a tiny 2-layer Llama-style decoder, loss and all parameter gradients
# ---------------------------------------------------------------------------------------------

LLAMA = dict(vocab=13, dim=16, n_layers=2, n_heads=2, head_dim=8, ffn_hidden=24,
             rope_theta=10000.0, norm_eps=1e-5, batch=2, seq=6)


def llama_param_shapes(c):
    """Parameter names and shapes, in a fixed order. Linear weights are (out, in): y = x @ W.T."""
    D, F = c["dim"], c["ffn_hidden"]
    shapes = {"tok_embeddings.weight": (c["vocab"], D)}
    for i in range(c["n_layers"]):
        L = f"layers.{i}."
        shapes[L + "attention_norm.weight"] = (D,)
        for w in ("wq", "wk", "wv", "wo"):
            shapes[L + f"attention.{w}.weight"] = (D, D)
        shapes[L + "ffn_norm.weight"] = (D,)
        shapes[L + "feed_forward.w1.weight"] = (F, D)
        shapes[L + "feed_forward.w2.weight"] = (D, F)
        shapes[L + "feed_forward.w3.weight"] = (F, D)
    shapes["norm.weight"] = (D,)
    shapes["output.weight"] = (c["vocab"], D)
    return shapes


def llama_forward(params, tokens, c):
    """Returns (logits (B,T,V), h after layer 0 (B,T,D))."""
    B, T = tokens.shape
    H, hd, eps, theta = c["n_heads"], c["head_dim"], c["norm_eps"], c["rope_theta"]
    h = params["tok_embeddings.weight"][tokens]  # (B, T, D)
    after_layer0 = None
    for i in range(c["n_layers"]):
        p = lambda name: params[f"layers.{i}.{name}.weight"]
        x = rmsnorm(h, p("attention_norm"), eps)
        q = (x @ p("attention.wq").T).reshape(B, T, H, hd)
        k = (x @ p("attention.wk").T).reshape(B, T, H, hd)
        v = (x @ p("attention.wv").T).reshape(B, T, H, hd)
        q, k = rope(q, 0, theta), rope(k, 0, theta)  # positions 0..T-1
        att = attention(q, k, v).reshape(B, T, H * hd)  # causal, no prefix
        h = h + att @ p("attention.wo").T
        x = rmsnorm(h, p("ffn_norm"), eps)
        h = h + (silu(x @ p("feed_forward.w1").T) * (x @ p("feed_forward.w3").T)) @ p("feed_forward.w2").T
        if i == 0:
            after_layer0 = h
    logits = rmsnorm(h, params["norm.weight"], eps) @ params["output.weight"].T
    return logits, after_layer0


def llama_loss(params, tokens, targets, c):
    logits, _ = llama_forward(params, tokens, c)
    return cross_entropy(logits.reshape(-1, c["vocab"]), targets.reshape(-1))


def llama_init(rng, c):
    """Linear weights normal std 0.3, embedding std 0.5, norm weights 1 + 0.1 * normal."""
    params = {}
    for name, shape in llama_param_shapes(c).items():
        if name == "tok_embeddings.weight":
            params[name] = normal(rng, shape, 0.5)
        elif "norm" in name:
            params[name] = (1.0 + normal(rng, shape, 0.1)).astype(np.float32)
        else:
            params[name] = normal(rng, shape, 0.3)
    return params


@case("model", "tiny_llama")
def tiny_llama(rng):
    """2-layer Llama decoder: params, tokens, targets, logits, loss, grad.<param>, hidden.after_layer0."""
    c = LLAMA
    params = llama_init(rng, c)
    tokens = rng.integers(0, c["vocab"], (c["batch"], c["seq"]))
    targets = rng.integers(0, c["vocab"], (c["batch"], c["seq"]))
    p64 = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
    logits, after0 = llama_forward(p64, tokens, c)
    loss, grads = jax.value_and_grad(llama_loss)(p64, tokens, targets, c)
    t = dict(params)
    t.update(tokens=tokens, targets=targets, logits=logits, loss=loss)
    t["hidden.after_layer0"] = after0
    t.update({"grad." + k: g for k, g in grads.items()})
    return t, c


# ---------------------------------------------------------------------------------------------
# main: run every case, then write README.md
# ---------------------------------------------------------------------------------------------

README_HEAD = """# Test fixtures

Generated by `tools/gen_fixtures.py` (do not edit by hand; rerun
`python3 tools/gen_fixtures.py` after `pip install jax numpy safetensors`).

Reference values computed with JAX in float64 from float32 inputs, stored as float32.

- Every tensor is float32, row-major. Integer data (ids, tokens, targets) is stored as
  float32 holding exact integers.
- Scalars (losses, `sum_all`/`mean_all` outputs and their `dout`, `total_norm`) have shape [1].
- Op cases: the inputs, `out` (forward), `dout` (random upstream gradient, shape of `out`)
  and `grad_<input>` = gradient of `sum(out * dout)` with respect to that input.
- Scalar parameters are in the safetensors metadata, as strings.
"""


def main():
    lines = [README_HEAD]
    total_bytes = 0
    for group, name, fn in CASES:
        path = f"{group}/{name}"
        rng = np.random.default_rng(zlib.crc32(path.encode()))
        tensors, meta = save(group, name, *fn(rng))
        size = os.path.getsize(os.path.join(ROOT, path + ".safetensors"))
        total_bytes += size
        doc = " ".join(fn.__doc__.split("\n")[0].split())
        lines.append(f"\n## `{path}.safetensors`\n\n{doc}\n")
        if meta:
            lines.append("Metadata: " + ", ".join(f"`{k}`={v}" for k, v in sorted(meta.items())) + "\n")
        lines.append("| tensor | shape |\n|---|---|")
        for k in sorted(tensors):
            lines.append(f"| `{k}` | {list(tensors[k].shape)} |")
        print(f"{path:34s} {size:7d} bytes")
    with open(os.path.join(ROOT, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{len(CASES)} files, {total_bytes} bytes")


if __name__ == "__main__":
    main()
