"""Integer ops of branching networks: residual add, average pooling, concatenation, ReLU6.

Each op has a pure integer function (the formula, with the float32 steps of the engine it matches)
and a layer with the life cycle of :mod:`quantlab.modules` (observe -> ``freeze`` ->
``quantize_inference``), used by :func:`quantlab.convert.quantize_model`.

Bit-exact with PyTorch's qnnpack engine (``torch.ops.quantized.add``, ``F.avg_pool2d`` /
``F.adaptive_avg_pool2d`` and ``torch.ops.quantized.cat`` on quint8 tensors, ``F.relu6``);
measured against ONNX Runtime in ``tests/test_ops.py``. Taught in notebook ``h_your_own_model``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import as_real_tensor, check_int, check_int_range, check_scale
from .modules import QModule, _copy_qparam, _QUnweighted, check_integer_input, relu6_limit
from .observer import QParam


def _f32(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# residual add

def add_multipliers(scale_a, scale_b, scale_y) -> dict:
    """The two multipliers of a quantized add, as floats and as qnnpack's fixed-point integers.

    ``M_a = f32(S_a / S_y)``, ``M_b = f32(S_b / S_y)``. Fixed point (qnnpack's
    ``pytorch_qnnp_compute_add_quantization_params``): with ``e`` the binary exponent of the
    larger multiplier, ``shift = 21 - e`` and ``m_a = rne(M_a * 2**shift)``,
    ``m_b = rne(M_b * 2**shift)``: the larger one lies in [2**21, 2**22).

    Returns:
        ``{"multiplier_a", "multiplier_b"}`` (float32 tensors), ``{"quantized_multiplier_a",
        "quantized_multiplier_b", "shift"}`` (python ints).
    Raises:
        ValueError: a ratio outside qnnpack's [2**-14, 2**8) (the branches' scales differ by
            more than the fixed-point format can hold).
    """
    m_a = _f32(scale_a) / _f32(scale_y)
    m_b = _f32(scale_b) / _f32(scale_y)
    for name, m in (("S_a / S_y", m_a), ("S_b / S_y", m_b)):
        if not 2.0**-14 <= float(m) < 2.0**8:
            raise ValueError(f"{name} = {float(m):.6g} is outside [2**-14, 2**8), the range of the "
                             "fixed-point add")
    exponent = int(torch.frexp(torch.maximum(m_a, m_b)).exponent) - 1
    shift = 21 - exponent
    scale = _f32(2.0**shift)
    return {"multiplier_a": m_a, "multiplier_b": m_b,
            "quantized_multiplier_a": int(torch.round(m_a * scale)),
            "quantized_multiplier_b": int(torch.round(m_b * scale)), "shift": shift}


def quantized_add(q_a, q_b, zero_point_a: int, zero_point_b: int, zero_point_y: int,
                  quantized_multiplier_a: int, quantized_multiplier_b: int, shift: int,
                  quant_min: int, quant_max: int) -> torch.Tensor:
    """``q_y = Z_y + round(S_a/S_y (q_a - Z_a) + S_b/S_y (q_b - Z_b))`` with integers only.

    As qnnpack's ``q8vadd``: ``acc = m_a (q_a - Z_a) + m_b (q_b - Z_b)`` (|acc| < 2**31: both
    multipliers < 2**22 and |q - Z| <= 255), then a rounding right shift by ``shift`` (ties away
    from zero, gemmlowp's ``RoundingDivideByPOT``), plus ``Z_y``, clamped to
    ``[quant_min, quant_max]`` (``quant_min = Z_y`` for a fused ReLU).

    Returns:
        int32 tensor of the broadcast shape.
    """
    a = q_a.to(torch.int64) - int(zero_point_a)
    b = q_b.to(torch.int64) - int(zero_point_b)
    acc = a * int(quantized_multiplier_a) + b * int(quantized_multiplier_b)  # |acc| < 2**31
    # RoundingDivideByPOT in one expression: (acc + 2**(s-1) - [acc < 0]) >> s
    shift = int(shift)
    y = (acc + ((1 << (shift - 1)) - (acc < 0).to(torch.int64))).bitwise_right_shift_(shift)
    return torch.clamp(y + int(zero_point_y), quant_min, quant_max).to(torch.int32)


class QAdd(QModule):
    """Quantized ``a + b`` (a residual add), optionally followed by a fused ReLU.

    The output range is observed on the float sum (after the ReLU); ``freeze(q_a, q_b)`` takes
    the two inputs' QParams and computes :func:`add_multipliers`.
    """

    _frozen_buffers = ("multiplier_a", "multiplier_b", "quantized_multiplier_a",
                       "quantized_multiplier_b", "shift")

    def __init__(self, num_bits: int = 8, relu: bool = False,
                 averaging_constant: float | None = None):
        super().__init__(qi=False, qo=True, num_bits=num_bits,
                         averaging_constant=averaging_constant)
        self.relu = bool(relu)
        #: the second input's QParam (``q_in`` is the first's), filled by freeze()
        self.q_in_b = QParam(num_bits, averaging_constant=averaging_constant)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = a + b
        if self.relu:
            y = F.relu(y)
        return self.q_out(y)

    @torch.no_grad()
    def freeze(self, q_a: QParam, q_b: QParam) -> QAdd:
        """Take the inputs' QParams and compute the multipliers of :func:`add_multipliers`."""
        self._take_q_in(q_a)
        if not isinstance(q_b, QParam) or not q_b.observed:
            raise RuntimeError("q_b must be an observed QParam: calibrate the model first")
        self.q_in_b = _copy_qparam(q_b)
        q_out = self._take_q_out(None)
        m = add_multipliers(self.q_in.scale, self.q_in_b.scale, q_out.scale)
        for name, value in m.items():
            setattr(self, name, torch.as_tensor(value))
        self._mark_frozen()
        return self

    def _qparams(self):
        return (self.q_in, self.q_in_b, self.q_out)

    def quantize_inference(self, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
        self._check_frozen()
        check_integer_input(q_a, self.q_in, "q_a")
        check_integer_input(q_b, self.q_in_b, "q_b")
        z_y = int(self.q_out.zero_point)
        low = max(z_y, self.q_out.quant_min) if self.relu else self.q_out.quant_min
        return quantized_add(q_a, q_b, int(self.q_in.zero_point), int(self.q_in_b.zero_point), z_y,
                             int(self.quantized_multiplier_a), int(self.quantized_multiplier_b),
                             int(self.shift), low, self.q_out.quant_max)

    def extra_repr(self):
        return f"relu={self.relu}"


# ---------------------------------------------------------------------------------------------
# average pooling

def avg_pool_multiplier(scale_x, scale_y, count, formula: str = "qnnpack") -> torch.Tensor:
    """The requantization multiplier of an average over a window of ``n`` values.

    ``formula="qnnpack"``: ``M = f32(S_x / f32(S_y * n))``, qnnpack's own average pool (what
    PyTorch's qnnpack engine runs without ``ceil_mode``). ``formula="reference"``:
    ``M = f32(f32(S_x / S_y) / n)``, PyTorch's generic quantized kernel (``qavg_pool2d``), which
    its qnnpack engine falls back to with ``ceil_mode=True``. The two differ in the last bit for
    some ``n`` (6, for one), which decides exact ties such as ``117 / 6 = 19.5``.
    """
    if formula == "qnnpack":
        return _f32(scale_x) / (_f32(scale_y) * _f32(count))
    if formula == "reference":
        return (_f32(scale_x) / _f32(scale_y)) / _f32(count)
    raise ValueError(f"formula must be 'qnnpack' or 'reference'; got {formula!r}")


def avg_pool_requantize(acc: torch.Tensor, count, scale_x, scale_y, zero_point_y: int,
                        quant_min: int, quant_max: int, formula: str = "qnnpack") -> torch.Tensor:
    """``q_y = clamp(rne(f32(acc) * M) + Z_y)`` with ``acc = sum (q_x - Z_x)`` over the window of
    ``count`` values and ``M`` from :func:`avg_pool_multiplier` (``formula``): the rounding
    division of the zero-point-corrected sum by the window size (times ``S_x / S_y``, 1 when the
    output keeps the input's qparams). ``acc`` must be exact in float32 (|acc| <= n * 255 <
    2**24).

    ``formula="reference"`` models PyTorch's generic kernel, which adds ``Z_y`` in float32
    *before* rounding, ``clamp(rne(f32(f32(acc) * M) + Z_y))``: an exact tie such as 63.5 is then
    broken by the parity of ``63.5 + Z_y`` instead of 63.5's.
    """
    if not isinstance(acc, torch.Tensor):
        raise TypeError(f"acc must be a torch.Tensor of window sums; got {type(acc).__name__}")
    if not bool(torch.isfinite(acc.to(torch.float64)).all()):
        raise ValueError("acc must hold finite window sums (no NaN or inf)")
    n = as_real_tensor(count, "count")
    if not bool(torch.isfinite(n.double()).all()) or not bool((n >= 1).all()):
        raise ValueError("count must be the number of values in each window: finite and >= 1")
    check_scale(scale_x, "scale_x")
    check_scale(scale_y, "scale_y")
    zero_point_y = check_int(zero_point_y, "zero_point_y")
    quant_min, quant_max = check_int_range(quant_min, quant_max)
    m = avg_pool_multiplier(scale_x, scale_y, count, formula)
    if formula == "reference":
        y = torch.round(acc.to(torch.float32) * m + float(int(zero_point_y)))
    else:
        y = torch.round(acc.to(torch.float32) * m) + int(zero_point_y)
    return torch.clamp(y, quant_min, quant_max).to(torch.int32)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _adaptive_counts(size_in: int, size_out: int) -> torch.Tensor:
    """Window lengths of adaptive pooling: [floor(i*I/O), ceil((i+1)*I/O))."""
    return torch.tensor([-(-(i + 1) * size_in // size_out) - (i * size_in) // size_out
                         for i in range(size_out)], dtype=torch.float64)


class QAvgPool2d(_QUnweighted):
    """Average pooling (``AvgPool2d``) or adaptive average pooling (``output_size`` given) on
    integers; the output keeps the input's qparams (as PyTorch), so ``M = 1/n`` and
    ``q_y = Z + rne(f32(sum (q_x - Z)) * f32(1/n))``.

    In float (calibration, QAT) the average is rounded back onto the input's grid when the
    graph passes the input's QParam (``forward(x, qparam)``), as the integers are.
    """

    #: the graph passes the input's QParam to forward (the output keeps the input's grid)
    takes_input_qparam = True

    def __init__(self, kernel_size=None, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, output_size=None, num_bits: int = 8):
        super().__init__(num_bits)
        if (kernel_size is None) == (output_size is None):
            raise ValueError("give exactly one of kernel_size (AvgPool2d) and output_size "
                             "(AdaptiveAvgPool2d)")
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = bool(ceil_mode), bool(count_include_pad)
        self.output_size = output_size

    def _pool(self, x):
        if self.output_size is not None:
            return F.adaptive_avg_pool2d(x, self.output_size)
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad)

    def forward(self, x, qparam: QParam | None = None):
        y = self._pool(x)
        return qparam.fake_quantize(y) if qparam is not None and qparam.observed else y

    def sums_and_counts(self, acc: torch.Tensor):
        """Exact window sums of the integers ``acc`` and the window sizes (float64)."""
        x = acc.to(torch.float64)
        if self.output_size is not None:
            h, w = x.shape[-2:]
            size = self.output_size
            oh, ow = (size, size) if isinstance(size, int) else size
            oh, ow = oh or h, ow or w
            n = _adaptive_counts(h, oh)[:, None] * _adaptive_counts(w, ow)[None, :]
            return torch.round(F.adaptive_avg_pool2d(x, (oh, ow)) * n), n
        sums = F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            True, divisor_override=1)
        if self.count_include_pad:
            # PyTorch's divisor: the window clipped to the padded input [-p, L + p), padding
            # counted, the overhang of ceil_mode not (aten's avg_pool2d: hend = min(hstart + kH,
            # H + padH), pool_size = (hend - hstart) * (wend - wstart))
            k, s, p = (_pair(v) for v in (self.kernel_size, self.stride or self.kernel_size,
                                           self.padding))
            counts = [torch.tensor([min(i * s[d] - p[d] + k[d], x.shape[-2 + d] + p[d])
                                    - (i * s[d] - p[d]) for i in range(sums.shape[-2 + d])],
                                   dtype=torch.float64) for d in (0, 1)]
            return sums, counts[0][:, None] * counts[1][None, :]
        ones = torch.ones_like(x[:1, :1])                  # count_include_pad=False: real values
        n = F.avg_pool2d(ones, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                         True, divisor_override=1)
        return sums, n

    def _integer_op(self, q_x):
        z = int(self.q_in.zero_point)
        sums, n = self.sums_and_counts(q_x.to(torch.int64) - z)  # |sum| <= n * 2**16
        formula = "reference" if self.ceil_mode and self.output_size is None else "qnnpack"
        return avg_pool_requantize(sums, n, self.q_in.scale, self.q_in.scale, z,
                                   self.q_in.quant_min, self.q_in.quant_max, formula)

    def extra_repr(self):
        if self.output_size is not None:
            return f"output_size={self.output_size}"
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


# ---------------------------------------------------------------------------------------------
# concatenation

def requantize_to(q_x: torch.Tensor, scale_x, zero_point_x: int, scale_y, zero_point_y: int,
                  quant_min: int, quant_max: int) -> torch.Tensor:
    """Move integers onto another grid: ``q_y = clamp(Z_y + rne(f32(S_x * (q_x - Z_x)) * f32(1/S_y)))``
    (dequantize, then quantize as ``torch.quantize_per_tensor``: PyTorch's quantized cat).
    The identity when the qparams are equal."""
    if not isinstance(q_x, torch.Tensor) or q_x.is_floating_point() or q_x.dtype == torch.bool:
        raise TypeError(f"q_x must be an integer tensor; got "
                        f"{q_x.dtype if isinstance(q_x, torch.Tensor) else type(q_x).__name__}")
    check_scale(scale_x, "scale_x")
    check_scale(scale_y, "scale_y")
    zero_point_x, zero_point_y = check_int(zero_point_x, "zero_point_x"), check_int(
        zero_point_y, "zero_point_y")
    quant_min, quant_max = check_int_range(quant_min, quant_max)
    x = (q_x.to(torch.int64) - int(zero_point_x)).to(torch.float32) * _f32(scale_x)
    y = torch.round(x * (1.0 / _f32(scale_y))) + int(zero_point_y)
    return torch.clamp(y, quant_min, quant_max).to(torch.int32)


class QCat(QModule):
    """``torch.cat`` of tensors with different qparams: each input is requantized onto the
    output's grid (observed on the concatenated float tensor), then concatenated."""

    def __init__(self, num_inputs: int, dim: int = 1, num_bits: int = 8,
                 averaging_constant: float | None = None):
        super().__init__(qi=False, qo=True, num_bits=num_bits,
                         averaging_constant=averaging_constant)
        self.dim = dim
        self.q_ins = torch.nn.ModuleList(QParam(num_bits, averaging_constant=averaging_constant)
                                         for _ in range(num_inputs))

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.q_out(torch.cat(xs, self.dim))

    @torch.no_grad()
    def freeze(self, q_ins: list[QParam]) -> QCat:
        if len(q_ins) != len(self.q_ins):
            raise ValueError(f"q_ins must hold {len(self.q_ins)} QParams; got {len(q_ins)}")
        for q in q_ins:
            if not isinstance(q, QParam) or not q.observed:
                raise RuntimeError("every input QParam must be observed: calibrate the model first")
        self.q_ins = torch.nn.ModuleList(_copy_qparam(q) for q in q_ins)
        self._take_q_out(None)
        self._mark_frozen()
        return self

    def _qparams(self):
        return (*self.q_ins, self.q_out)

    def quantize_inference(self, *q_xs: torch.Tensor) -> torch.Tensor:
        self._check_frozen()
        q_out = self.q_out
        parts = []
        for i, (q_x, q_in) in enumerate(zip(q_xs, self.q_ins)):
            check_integer_input(q_x, q_in, f"q_xs[{i}]")
            parts.append(requantize_to(q_x, q_in.scale, int(q_in.zero_point), q_out.scale,
                                       int(q_out.zero_point), q_out.quant_min, q_out.quant_max))
        return torch.cat(parts, self.dim)

    def extra_repr(self):
        return f"dim={self.dim}"


# ---------------------------------------------------------------------------------------------
# ReLU6 and the input quantizer

class QReLU6(_QUnweighted):
    """ReLU6 on integers: ``clamp(q, Z, Z + rne(f32(6 * f32(1 / S))))`` (``modules.relu6_limit``); the
    output keeps the input's qparams."""

    #: the graph passes the input's QParam to forward (the output keeps the input's grid)
    takes_input_qparam = True

    def forward(self, x, qparam: QParam | None = None):
        y = torch.clamp(x, 0.0, 6.0)
        return qparam.fake_quantize(y) if qparam is not None and qparam.observed else y

    def integer_range(self) -> tuple[int, int]:
        """The clamp on the integers, ``[Z, relu6_limit]`` (the export writes it as a Clip)."""
        return int(self.q_in.zero_point), relu6_limit(self.q_in)

    def _integer_op(self, q_x):
        return torch.clamp(q_x.to(torch.int32), *self.integer_range())


def clamp_limit(value: float, qparam: QParam) -> int:
    """The integer of real ``value`` on ``qparam``'s grid, clamped to its range:
    ``clamp(Z + rne(f32(value) * f32(1 / S)), quant_min, quant_max)`` (as PyTorch's quantized
    clamp and hardtanh)."""
    steps = torch.round(torch.tensor(float(value)) * (1.0 / qparam.scale.to(torch.float32)))
    return min(max(int(qparam.zero_point) + int(steps), qparam.quant_min), qparam.quant_max)


class QHardtanh(_QUnweighted):
    """Hardtanh (a clamp to ``[min_val, max_val]``) on integers: ``clamp(q, lo, hi)`` with ``lo``
    and ``hi`` the integers of ``min_val`` and ``max_val`` on the input's grid (see
    :func:`clamp_limit`); the output keeps the input's qparams. Bit-exact with PyTorch's quantized
    ``hardtanh``."""

    #: the graph passes the input's QParam to forward (the output keeps the input's grid)
    takes_input_qparam = True

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0, num_bits: int = 8):
        super().__init__(num_bits)
        min_val, max_val = as_real_tensor(min_val, "min_val"), as_real_tensor(max_val, "max_val")
        if not float(min_val) < float(max_val):
            raise ValueError(f"min_val must be below max_val; got {float(min_val)} and "
                             f"{float(max_val)}")
        self.min_val, self.max_val = float(min_val), float(max_val)

    def forward(self, x, qparam: QParam | None = None):
        y = torch.clamp(x, self.min_val, self.max_val)
        return qparam.fake_quantize(y) if qparam is not None and qparam.observed else y

    def integer_range(self) -> tuple[int, int]:
        """The clamp on the integers (the export writes it as a Clip)."""
        return clamp_limit(self.min_val, self.q_in), clamp_limit(self.max_val, self.q_in)

    def _integer_op(self, q_x):
        return torch.clamp(q_x.to(torch.int32), *self.integer_range())

    def extra_repr(self):
        return f"min_val={self.min_val}, max_val={self.max_val}"


class QInput(QModule):
    """Quantizes the model's input when it does not go straight into one weighted layer (e.g. a
    model starting with a branch): ``q_in`` observes the images; integers pass unchanged."""

    def __init__(self, num_bits: int = 8, averaging_constant: float | None = None):
        super().__init__(qi=True, qo=False, num_bits=num_bits,
                         averaging_constant=averaging_constant)

    def forward(self, x):
        return self.q_in(x)

    def freeze(self, q_in=None):
        self._take_q_in(None)
        self._mark_frozen()
        return self

    def quantize_inference(self, q_x):
        self._check_frozen()
        return check_integer_input(q_x, self.q_in)
