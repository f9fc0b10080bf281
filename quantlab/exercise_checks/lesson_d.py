"""The checks of exercises/d_exercises.ipynb: BN folding, int32 bias, float requantization, QLinear.freeze
(notebook d_post_training_quantize)."""

from __future__ import annotations

import warnings

import torch
from hypothesis import strategies as st

from .. import qparams
from ..modules import QLinear
from ..reference import DEPRECATION_MESSAGES
from .common import (
    INT32_MAX,
    INT32_MIN,
    Case,
    Exercise,
    Mismatch,
    close,
    exact_ints,
    floats32,
    same_floats,
    same_tuple,
    show,
    t,
)
from .lesson_a import FLOAT64_CASE, RECIPROCAL_CASES


def _d1():
    def bn(c, var, bias=True, shape=(3, 2, 1, 1)):
        g = torch.Generator().manual_seed(c)
        w = torch.randn(shape, generator=g)
        n = shape[0]
        return dict(weight=w, bias=torch.randn(n, generator=g) if bias else None,
                    mean=torch.randn(n, generator=g), var=var,
                    gamma=torch.randn(n, generator=g), beta=torch.randn(n, generator=g), eps=1e-5)

    cases = [
        # each case catches one more mistake (in this order; see lesson_d.py's MISTAKES)
        Case(bn(0, t([1.0, 1.0, 1.0])), "b' = beta + (b - mean) * gamma / sqrt(var + eps): the "
             "mean is scaled with the bias (b * factor - mean is not the same)"),
        Case(bn(4, t([4.0, 2.0, 9.0])), "divide by the standard deviation sqrt(var + eps), not by "
             "the variance var"),
        Case(bn(1, t([0.0, 2.0, 9.0])), "eps goes inside the square root: sqrt(var + eps), not "
             "sqrt(var) + eps (with var = 0 the two differ most)"),
        Case(dict(bn(5, t([0.0, 1e-3, 1.0])), eps=1e-3), "eps is an argument (1e-3 here): do not "
             "hard-code 1e-5"),
        Case(bn(2, t([4.0, 1.0, 0.5]), bias=False), "a conv without bias (None): use 0 for b"),
        Case(bn(3, t([1.5, 3.0, 0.5]), shape=(3, 4)), "a Linear weight (C_out, C_in): reshape the"
             " factor to (C_out, 1, ...) for any weight dimension"),
    ]

    @st.composite
    def strat(draw):
        seed = draw(st.integers(0, 2**16))
        ndim = draw(st.sampled_from([2, 4]))
        c = draw(st.integers(1, 4))
        shape = (c, 2, 3, 3) if ndim == 4 else (c, 3)
        var = t(draw(st.lists(floats32(0.0, 100.0), min_size=c, max_size=c)))
        eps = draw(st.sampled_from([1e-5, 1e-3]))
        d = bn(seed, var, draw(st.booleans()), shape)
        d["eps"] = eps
        bias = f"torch.randn({c}, generator=g)" if d["bias"] is not None else "None"
        return Case(d, desc=f"g = torch.Generator().manual_seed({seed}); weight = torch.randn({shape}, "
                    f"generator=g); bias = {bias}; mean = torch.randn({c}, generator=g); var = "
                    f"torch.tensor({var.tolist()}); gamma = torch.randn({c}, generator=g); beta = "
                    f"torch.randn({c}, generator=g); eps = {eps}")

    def oracle(weight, bias, mean, var, gamma, beta, eps):
        from torch.nn.utils.fusion import fuse_conv_bn_weights

        w, b = fuse_conv_bn_weights(weight, bias, mean, var, eps, gamma, beta)
        return w.detach(), b.detach()

    plain = same_tuple(("weight", close(1e-5, 1e-6)), ("bias", close(1e-5, 1e-6)))

    def compare(e, g):
        m = plain(e, g)
        if m is not None and m.hint is None and isinstance(g, (tuple, list)) and all(
                isinstance(v, torch.Tensor) and v.is_floating_point() for v in g) and \
                not all(bool(torch.isfinite(v).all()) for v in g):
            m.hint = ("got inf or nan: with var = 0, sqrt(var) is 0 and the factor divides by 0; "
                      "that is what eps is for: sqrt(var + eps)")
        return m

    return Exercise("d", 1, "fold_bn", oracle, compare,
                    lambda: cases, strat,
                    "w' = w * gamma / sqrt(var + eps) per output channel; b' = beta + (b - mean) * "
                    "gamma / sqrt(var + eps)")


def _bias_oracle(bias, scale_x, scale_w):
    """PyTorch's int32 bias: quantize_per_channel(b, f32(S_x * S_w), 0, qint32)."""
    s = (torch.as_tensor(scale_x, dtype=torch.float32) * torch.as_tensor(scale_w,
                                                                          dtype=torch.float32))
    s = s.expand(bias.shape).contiguous()
    with warnings.catch_warnings():
        for m in DEPRECATION_MESSAGES:
            warnings.filterwarnings("ignore", message=m)
        try:
            q = torch.quantize_per_channel(bias.to(torch.float32), s.double(),
                                           torch.zeros(bias.shape, dtype=torch.long), 0,
                                           torch.qint32)
            return q.int_repr()
        except (RuntimeError, AttributeError):  # quantized dtypes removed: the same formula
            q = torch.round(bias.to(torch.float32) * (1.0 / s)).double()
            return q.clamp(INT32_MIN, INT32_MAX).to(torch.int32)


def _d2():
    x_r, s_r = RECIPROCAL_CASES[0]
    x_d, s_d = FLOAT64_CASE
    one = t(1.0)
    cases = [
        # each case catches one more mistake (in this order; see lesson_d.py's MISTAKES)
        Case(dict(bias=t([0.7, -0.7, 1.2]), scale_x=one, scale_w=one),
             "round to the nearest integer (torch.round): .to(torch.int32) truncates toward zero "
             "(0.7 -> 0 instead of 1)"),
        Case(dict(bias=t([-1.5, 1.5, 3.5, 0.5, 2.5]), scale_x=one, scale_w=one),
             "ties at .5: torch.round rounds half to even (-1.5 -> -2, 0.5 -> 0, 2.5 -> 2); "
             "floor(x + 0.5) rounds ties up"),
        Case(dict(bias=t([0.2471, -0.2625, 0.0754]), scale_x=t(0.034925),
                  scale_w=t([0.0025, 0.0024, 0.0025])),
             "q_b = round(b * (1 / (S_x * S_w))) is far larger than 127: keep it in int32, never clamp "
             "it to int8"),
        Case(dict(bias=t([x_d]), scale_x=one, scale_w=t([s_d])),
             "compute in float32, as PyTorch: b * (1 / (S_x * S_w)) in float64 rounds this value to "
             "the other integer"),
        Case(dict(bias=t([x_r]), scale_x=one, scale_w=t([s_r])),
             "multiply by the float32 reciprocal 1 / (S_x * S_w), as PyTorch; dividing rounds this "
             "value to the other integer"),
        Case(dict(bias=t([1e9, -1e9, 3.0]), scale_x=t(1e-3), scale_w=t([1.0, 1.0, 1.0])),
             "int32 limits: clamp q_b to [-2**31, 2**31 - 1] (in int64; float32 cannot hold "
             "2**31 - 1)"),
        Case(dict(bias=t([0.1, -0.2]), scale_x=t(1e-4), scale_w=t(1e-5)),
             "a per-tensor weight scale (shape ()) broadcasts over the channels"),
    ]

    @st.composite
    def strat(draw):
        c = draw(st.integers(1, 5))
        b = t(draw(st.lists(floats32(-100.0, 100.0), min_size=c, max_size=c)))
        sx = t(draw(floats32(1e-4, 1.0)))
        per_channel = draw(st.booleans())
        sw = (t(draw(st.lists(floats32(1e-4, 1.0), min_size=c, max_size=c))) if per_channel
              else t(draw(floats32(1e-4, 1.0))))
        return Case(dict(bias=b, scale_x=sx, scale_w=sw))

    return Exercise("d", 2, "quantize_bias", _bias_oracle, exact_ints, lambda: cases, strat,
                    "q_b = clamp(round(b * (1 / (S_x * S_w))), int32 range) with scale S_x * S_w "
                    "and zero point 0, as an int32 tensor")


def _requant_oracle(acc, multiplier, zero_point, quant_min=0, quant_max=255):
    m = torch.as_tensor(multiplier, dtype=torch.float32)
    if m.dim() == 1:
        m = m.reshape([1, -1] + [1] * (acc.dim() - 2))
    y = torch.round(acc.to(torch.float32) * m) + float(zero_point)
    return torch.clamp(y, quant_min, quant_max).to(torch.int32)


def _d3():
    cases = [
        # each case catches one more mistake (in this order; see lesson_d.py's MISTAKES)
        Case(dict(acc=torch.tensor([[7, 13]]), multiplier=t(0.1), zero_point=4),
             "round float32(acc) * M to the nearest integer (torch.round): casting to int truncates "
             "toward zero (0.7 -> 0 instead of 1)"),
        Case(dict(acc=torch.tensor([[-50, 20]]), multiplier=t(0.1), zero_point=10),
             "add Z_y, then clamp: clamping round(acc * M) before adding Z_y gives -5 -> 0 -> 10 "
             "instead of 5"),
        Case(dict(acc=torch.tensor([[-3, 3, 7, 1, 5]]), multiplier=t(0.5), zero_point=100),
             "ties at .5: torch.round rounds half to even (-1.5 -> -2, 0.5 -> 0, 2.5 -> 2); "
             "floor(x + 0.5) rounds ties up"),
        Case(dict(acc=torch.tensor([[1, 3, -1]]), multiplier=t(0.5), zero_point=11),
             "round first, then add Z_y: with an odd Z_y, adding it before rounding moves each tie "
             "(0.5 + 11 = 11.5 -> 12, but round(0.5) + 11 = 11)"),
        Case(dict(acc=torch.tensor([[-1000, 1000, 300]]), multiplier=t(0.1), zero_point=0,
                  quant_min=-128, quant_max=127),
             "clamp to [quant_min, quant_max], the arguments (int8's [-128, 127] here): do not "
             "hard-code [0, 255]"),
        Case(dict(acc=torch.tensor([[10**6, -(10**6)]]), multiplier=t(0.01), zero_point=128),
             "clamp to [quant_min, quant_max] after adding the zero point"),
        Case(dict(acc=torch.tensor([[100, 100], [-40, 7]]), multiplier=t([0.01, 0.5]),
                  zero_point=3), "a per-channel multiplier (C,) belongs to axis 1 of acc (the "
             "channels), not to axis 0 (the batch)"),
        Case(dict(acc=torch.arange(8).reshape(1, 2, 2, 2) * 1000, multiplier=t([0.001, 0.02]),
                  zero_point=0), "a conv accumulator (N, C, H, W): reshape M to (1, C, 1, 1); "
             "as it is, M broadcasts along the last axis (W)"),
        Case(dict(acc=torch.tensor([[1069547519]]), multiplier=t(2.0**-23), zero_point=0),
             "int32-sized acc: convert acc to float32 first (as qnnpack), then multiply by the "
             "float32 M; float64 rounds this value differently"),
        Case(dict(acc=torch.tensor([[INT32_MAX, INT32_MIN]]), multiplier=t(1e-9), zero_point=128),
             "int32 limits: float32(acc) * M, rounded, plus Z_y"),
    ]

    @st.composite
    def strat(draw):
        c = draw(st.integers(1, 3))
        n = draw(st.integers(1, 3))
        acc = draw(st.lists(st.integers(-2**20, 2**20), min_size=n * c, max_size=n * c))
        per_channel = draw(st.booleans())
        m = (t(draw(st.lists(floats32(1e-6, 1.0), min_size=c, max_size=c))) if per_channel
             else t(draw(floats32(1e-6, 1.0))))
        z = draw(st.integers(0, 255))
        return Case(dict(acc=torch.tensor(acc).reshape(n, c), multiplier=m, zero_point=z))

    return Exercise("d", 3, "requantize", _requant_oracle, exact_ints, lambda: cases, strat,
                    "q_y = clamp(round(float32(acc) * M) + Z_y, quant_min, quant_max), rounded "
                    "half to even")


def _linear_case(seed, c_out, c_in, x_range, y_range, bias_scale=0.1, hint=""):
    """A Linear layer's weight and bias drawn as integers over 4096: exact float32 values, the same on
    every CPU (torch.randn is not), so that a case that tells two multipliers apart does so everywhere."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2048, 2048, (c_out, c_in), generator=g) / 4096
    b = torch.randint(-4096, 4096, (c_out,), generator=g) / 4096 * bias_scale
    sx, _ = qparams.calc_scale_zero_point(t(x_range[0]), t(x_range[1]))
    sy, _ = qparams.calc_scale_zero_point(t(y_range[0]), t(y_range[1]))
    return Case(dict(weight=w, bias=b, scale_x=sx, scale_y=sy), hint,
                desc=f"g = torch.Generator().manual_seed({seed}); weight = torch.randint(-2048, 2048, "
                     f"({c_out}, {c_in}), generator=g) / 4096; bias = torch.randint(-4096, 4096, "
                     f"({c_out},), generator=g) / 4096 * {bias_scale}; scale_x={sx.item()!r}, "
                     f"scale_y={sy.item()!r}")


def _float32_multiplier(expected, got, what=""):
    """M bit for bit: the float32 number qnnpack's kernel multiplies by."""
    if isinstance(got, torch.Tensor) and got.dtype == torch.float64:
        return Mismatch(f"{what}: {show(expected)}", f"{what}: {show(got)}",
                        "compute M in float32 tensors, as qnnpack: a float64 M is not the number its "
                        "kernel multiplies by")
    return same_floats(expected, got, what)


def _d4():
    quotient = _linear_case(2, 3, 4, (-1.0, 1.0), (-0.5, 6.0))
    cases = [_linear_case(0, 3, 4, (-1.0, 1.0), (-2.0, 2.0)),
             Case(quotient.kwargs, "M = (S_x * S_w) * f32(1 / S_y), a product with the float32 reciprocal, "
                  "as qnnpack: the quotient S_x * S_w / S_y (ONNX Runtime's formula) differs from it in "
                  "the last bit here", quotient.desc),
             _linear_case(1, 4, 8, (0.0, 3.0), (-0.5, 6.0), bias_scale=2.0)]

    @st.composite
    def strat(draw):
        seed = draw(st.integers(0, 2**16))
        return _linear_case(seed, draw(st.integers(1, 4)), draw(st.integers(1, 6)),
                            (-draw(floats32(0.01, 10.0)), draw(floats32(0.01, 10.0))),
                            (-draw(floats32(0.01, 10.0)), draw(floats32(0.01, 10.0))))

    def oracle(weight, bias, scale_x, scale_y):
        fc = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            fc.weight.copy_(weight)
            fc.bias.copy_(bias)
        layer = QLinear(fc, per_channel=True)
        for qp, s in ((layer.q_in, scale_x), (layer.q_out, scale_y)):
            qp.scale, qp.zero_point = s.clone(), torch.tensor(0, dtype=torch.int32)
            qp.min_val, qp.max_val = t(0.0), t(0.0)
        layer.freeze()
        return layer.weight_int, layer.q_w.scale, layer.bias_int.to(torch.int32), layer.multiplier

    parts = dict(q_w=exact_ints, scale_w=close(1e-6), q_b=exact_ints, multiplier=_float32_multiplier)
    names = list(parts)

    def compare(e, g):
        """The weights' scale first (a wrong one makes q_w, q_b and M wrong too), then q_w, q_b, M."""
        if not isinstance(g, (tuple, list)) or len(g) != 4:
            return same_tuple(*parts.items())(e, g)
        for name in ("scale_w", "q_w", "q_b", "multiplier"):
            i = names.index(name)
            m = parts[name](e[i], g[i], name)
            if m is None:
                continue
            if m.hint is None and name == "scale_w":
                per_tensor = isinstance(g[i], torch.Tensor) and g[i].numel() == 1 and e[i].numel() > 1
                m.hint = ("weights per channel: one scale per output channel (calc_min_max(weight, "
                          "axis=0)), not one for the whole tensor" if per_tensor else
                          "symmetric weights: scale_w = max|w_c| / 127.5 per channel "
                          "(calc_scale_zero_point(..., symmetric=True)), not an affine range")
            elif m.hint is None and name == "q_w":
                m.hint = ("signed int8 weights have zero point 0 (calc_scale_zero_point(..., "
                          "signed=True, symmetric=True)); an unsigned symmetric zero point is 128")
            return m
        return None

    return Exercise("d", 4, "freeze_linear", oracle, compare, lambda: cases, strat,
                    "per-channel symmetric int8 weights (scale max|w_c| / 127.5, zero point 0); "
                    "q_b = round(b * (1 / (S_x * S_w))); M = (S_x * S_w) * (1 / S_y) in float32")


def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_d1(), _d2(), _d3(), _d4()]
