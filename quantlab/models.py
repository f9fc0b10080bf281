"""The MNIST CNN of the original series, a BatchNorm variant, and whole-model quantization.

``Net``: Conv2d(1,40,3,1) -> ReLU -> MaxPool2d(2,2) -> Conv2d(40,40,3,1,groups=20) -> ReLU ->
MaxPool2d(2,2) -> flatten -> Linear(5*5*40, 10). ``NetBN`` adds BatchNorm2d after each conv.
Taught in notebook ``b_model``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import (
    check_bool,
    check_float_tensor,
    check_int,
    check_iterable_of_batches,
    check_real,
    check_tensor,
    images_and_labels,
)
from .modules import (
    QConv2d,
    QConvBNReLU,
    QFlatten,
    QLinear,
    QMaxPool2d,
    QModule,
    calibration_mode,
    check_integer_input,
    check_multiplier_formula,
)
from .observer import QParam
from .qparams import check_num_bits


class Net(nn.Module):
    """The original's CNN: 11,170 parameters, (N, 1, 28, 28) -> (N, 10) logits."""

    def __init__(self, num_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(num_channels, 40, 3, 1)
        self.conv2 = nn.Conv2d(40, 40, 3, 1, groups=20)
        self.fc = nn.Linear(5 * 5 * 40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        return self.fc(torch.flatten(x, 1))


class NetBN(nn.Module):
    """``Net`` with BatchNorm2d after each conv (to be folded into the conv when quantized)."""

    def __init__(self, num_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(num_channels, 40, 3, 1)
        self.bn1 = nn.BatchNorm2d(40)
        self.conv2 = nn.Conv2d(40, 40, 3, 1, groups=20)
        self.bn2 = nn.BatchNorm2d(40)
        self.fc = nn.Linear(5 * 5 * 40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2, 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2, 2)
        return self.fc(torch.flatten(x, 1))


MODELS = {"net": Net, "netbn": NetBN}


# --------------------------------------------------------------------------------------------
# whole-model quantization (taught in notebook d_post_training_quantize)

class QuantizedNet(nn.Module):
    """A chain of quantized layers built from ``Net`` or ``NetBN`` by :func:`quantize_model`.

    ``forward(x)`` runs fake quantization on float images (calibration, QAT);
    ``calibrate(data)`` observes ranges; ``freeze()``; ``quantize_inference(x)`` runs the integer
    layers on float images and returns dequantized logits; ``integer_inference(q_x)`` maps the
    input integers to the logits' integers.
    """

    def __init__(self, layers: list[nn.Module], num_bits: int, per_channel: bool,
                 fixed_point: bool, qat: bool):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, QModule) and not getattr(layer, "qname", None):
                layer.qname = f"layers[{i}] ({type(layer).__name__})"  # names it in errors
        # each layer without its own input QParam reads the previous weighted layer's output
        # QParam in the forward pass (the same one freeze() will copy into its q_in)
        previous = None
        for layer in self.layers:
            if isinstance(layer, QModule) and not layer.qi and hasattr(layer, "link_input"):
                layer.link_input(previous)
            if isinstance(layer, QModule) and layer.q_out is not None:
                previous = layer.q_out
        self.num_bits, self.per_channel = num_bits, per_channel
        self.fixed_point, self.qat = fixed_point, qat
        if qat:
            # fine-tuning from a trained float model: a third of its peak learning rate, and no
            # shift augmentation (measured best at 2-4 bits on the embedded digits)
            self.default_lr, self.default_augment = 1e-3, 0

    @property
    def q_in(self):
        """The QParam of the input images."""
        return self.layers[0].q_in

    @property
    def q_out(self):
        """The QParam of the logits."""
        return self.layers[-1].output_qparam

    @property
    def frozen(self) -> bool:
        return all(layer.frozen for layer in self.layers if isinstance(layer, QModule))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            self._check_images(x, "x")
        for layer in self.layers:
            x = layer(x)
        return x

    @torch.no_grad()
    def calibrate(self, data, num_batches: int | None = None) -> QuantizedNet:
        """Observe activation ranges on calibration data (use training data, never the test set).

        Args:
            data: a DataLoader of ``(images, labels)`` or any iterable of image batches.
            num_batches: stop after this many batches (None: all).
        """
        check_iterable_of_batches(data, "data")
        if num_batches is not None:
            num_batches = check_int(num_batches, "num_batches", 1)
        seen = 0
        with calibration_mode(self):
            for batch in data:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                if not isinstance(images, torch.Tensor):
                    raise TypeError(f"data must yield image tensors or (images, labels); got "
                                    f"{type(images).__name__}")
                self._check_images(images, "the images of data")
                self(images)
                seen += 1
                if num_batches is not None and seen >= num_batches:
                    break
        if seen == 0:
            raise ValueError("data yielded no batches: calibration needs at least one batch")
        return self

    def freeze_bn_stats(self, frozen: bool = True) -> QuantizedNet:
        """Fold BN's running statistics during training too (True), or let BN normalize with the
        batch statistics while training (False; see QConvBNReLU)."""
        frozen = check_bool(frozen, "frozen")
        for m in self.modules():
            if isinstance(m, QConvBNReLU):
                m.freeze_bn_stats = frozen
        return self

    def freeze_observers(self) -> QuantizedNet:
        """Stop updating activation ranges (e.g. for the last epochs of QAT)."""
        for m in self.modules():
            if isinstance(m, QParam) and m.averaging_constant != 1.0:
                m.observing = False
        return self

    @torch.no_grad()
    def freeze(self, multiplier: str | None = None) -> QuantizedNet:
        """Freeze every layer, feeding each the previous layer's output QParam.

        Args:
            multiplier: ``"qnnpack"`` or ``"onnxruntime"``, the formula of the float32
                requantization multipliers (None: as given to ``quantize_model``).

        The model is left in eval mode; if a layer refuses (e.g. a bias that does not fit the
        int32 bias), the previous train/eval mode is restored and the error names the layer.
        """
        if multiplier is not None:
            check_multiplier_formula(multiplier)
        was_training = self.training
        self.eval()
        try:
            previous = None
            for layer in self.layers:
                if isinstance(layer, QModule):
                    kw = {"multiplier": multiplier} if hasattr(layer, "multiplier_formula") else {}
                    layer.freeze(q_in=None if previous is None or layer.qi else previous, **kw)
                    previous = layer.output_qparam
        except BaseException:
            self.train(was_training)
            raise
        return self

    def _check_frozen(self):
        stale = [layer.label() for layer in self.layers if isinstance(layer, QModule)
                 and layer.stale]
        if stale:
            raise RuntimeError(f"the model was frozen, but the qparams of {', '.join(stale)} "
                               "changed since (calibrate(), a forward pass in training mode, or QAT "
                               "observed new ranges): call freeze() again before integer inference")
        if not self.frozen:
            raise RuntimeError("quantize_inference needs freeze() first: "
                               "qnet.calibrate(train_loader); qnet.freeze()")

    #: images per chunk in integer inference: small tensors stay in the CPU caches (measured
    #: 3-4x faster than one 10,000-image batch on 2 cores)
    chunk_size = 256

    @torch.no_grad()
    def integer_inference(self, q_x: torch.Tensor) -> torch.Tensor:
        """int32 image integers -> int32 logit integers, integer arithmetic only.

        A max-pool after a conv is applied to the conv's accumulators (same integers, faster).
        Large batches are processed in chunks of ``chunk_size`` images.
        """
        self._check_frozen()
        check_integer_input(q_x, self.q_in)
        self._check_images(q_x, "q_x")
        if q_x.dim() > 0 and q_x.shape[0] > self.chunk_size:
            return torch.cat([self._integer_chunk(c) for c in q_x.split(self.chunk_size)])
        return self._integer_chunk(q_x)

    def _integer_chunk(self, q_x: torch.Tensor) -> torch.Tensor:
        i, layers = 0, list(self.layers)
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, (QConv2d, QConvBNReLU)) and isinstance(nxt, QMaxPool2d) \
                    and nxt.padding == 0:
                q_x = layer.quantize_inference(q_x, pool=(nxt.kernel_size,
                                                          nxt.stride or nxt.kernel_size))
                i += 2
            else:
                q_x = layer.quantize_inference(q_x)
                i += 1
        return q_x

    def _check_images(self, x: torch.Tensor, name: str):
        """A batch of images (N, C, H, W) of the size the model was built for."""
        shape = getattr(self, "input_shape", None)
        want = "(N, C, H, W)" if shape is None else f"(N, {', '.join(map(str, shape))})"
        if x.dim() != 4 or (shape is not None and tuple(x.shape[1:]) != tuple(shape)):
            raise ValueError(f"{name} must be a batch of images of shape {want}; got "
                             f"{tuple(x.shape)}")

    @torch.no_grad()
    def quantize_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Float images -> quantize with ``q_in`` -> integer layers -> dequantized float logits."""
        self._check_frozen()
        check_float_tensor(x, "x")
        self._check_images(x, "x")
        return self.q_out.dequantize_tensor(self.integer_inference(self.q_in.quantize_tensor(x)))

    def accuracy(self, loader) -> float:
        """Accuracy of the integer model (``quantize_inference``) on ``loader`` of
        ``(images, labels)``, as a fraction in [0, 1]."""
        check_iterable_of_batches(loader, "loader")
        correct = total = 0
        for batch in loader:
            images, labels = images_and_labels(batch, "loader")
            correct += int((self.quantize_inference(images).argmax(1) == labels).sum())
            total += len(labels)
        if total == 0:
            raise ValueError("loader yielded no images")
        return correct / total

    def size_bytes(self) -> dict:
        """Storage of the frozen integer model: weights at ceil(num_bits/8) bytes each, int32
        biases, and per output channel a float32 multiplier plus the weight's scale and zero
        point; compared with the float32 parameters of the float layers."""
        self._check_frozen()
        int_bytes, float_bytes = 0, 0
        per_weight = (self.num_bits + 7) // 8
        for layer in self.layers:
            if isinstance(layer, QModule) and hasattr(layer, "weight_int"):
                w, b = layer.float_weight_bias()
                float_bytes += 4 * (w.numel() + (b.numel() if b is not None else 0))
                channels = layer.weight_int.shape[0]
                int_bytes += per_weight * layer.weight_int.numel() + 4 * channels  # w, bias
                int_bytes += 4 * channels + 4 * layer.q_w.scale.numel() * 2      # M, S_w, Z_w
        return {"float32": float_bytes, "integer": int_bytes}


def quantize_model(net: nn.Module, num_bits: int = 8, per_channel: bool = True,
                   qat: bool = False, fixed_point: bool = False,
                   averaging_constant: float | None = None,
                   output_bits: int | None = 8, multiplier: str = "qnnpack", observer=None,
                   weight_observer=None, learn_ranges=False) -> QuantizedNet:
    """Build the quantized version of a ``Net`` or ``NetBN`` (a deep copy: ``net`` is untouched).

    Conv layers get their ReLU fused (the output range is observed after it); ``NetBN``'s BN is
    folded into its convs (``QConvBNReLU``).

    Args:
        num_bits: bits of weights and activations (2..16).
        per_channel: symmetric per-channel int weights (True) or affine per-tensor (False).
        qat: return a trainable model for quantization-aware training: activation ranges follow a
            moving average (``averaging_constant`` 0.01 unless given), BN statistics are frozen
            (``freeze_bn_stats``), the model is in train mode and carries its own default
            learning rate and augmentation for ``quantlab.training.train``.
        fixed_point: integer-only requantization (Q31 multiplier and shift) instead of float.
        output_bits: bits of the logits, the model's output to the host (8 by default; None
            for ``num_bits``). Below 8 bits ``num_bits`` applies to the input, every weight and
            every hidden activation, but 10 logits on 2 bits (4 levels) would mostly tie at the
            top level, so the output keeps its own width.
        multiplier: ``"qnnpack"`` (default) or ``"onnxruntime"``: how ``freeze()`` computes the
            float32 requantization multiplier, as PyTorch's qnnpack (``f32(f32(S_x*S_w) *
            f32(1/S_y))``) or as ONNX Runtime (``f32(f32(S_x*S_w) / S_y)``) does.
        observer: the range estimator of the hidden activations (the conv outputs): None
            (min/max, or the moving average for QAT), a name in ``quantlab.observers.OBSERVERS``
            or an ``Observer`` (copied for each QParam). The input keeps min/max (the pixel
            range, known exactly; entropy would clip the white strokes) and so do the logits
            (clipping the top logit creates ties for the argmax). Notebook ``da_calibration``.
        weight_observer: ``None``/``"minmax"`` or ``"mse"`` (clipping per channel with
            ``per_channel=True``).
        learn_ranges: with ``qat=True``, learn the ranges instead of following a moving average
            (``quantlab.learned``): ``True`` or ``"lsq"`` learns every step with LSQ (weights per
            output channel, activations per tensor); ``"pact"`` learns the clip of the conv
            outputs (after their ReLU) with PACT and the other steps with LSQ; ``False``
            (default) learns none. The steps start from ``observer`` (hidden activations and
            the input; ``"mse"`` unless given), ``weight_observer`` (``"mse"`` unless given)
            and min/max for the logits, on the first batch or in ``calibrate()``; the zero
            points stay as initialised. Notebook ``fa_learned_step_size``.
    """
    import copy

    from .observers import WEIGHT_OBSERVERS, Observer, check_observer, make_observer

    observer = check_observer(observer, "observer")
    weight_observer = check_observer(weight_observer, "weight_observer", WEIGHT_OBSERVERS)
    if isinstance(weight_observer, Observer):
        raise TypeError("weight_observer must be None or one of "
                        f"{list(WEIGHT_OBSERVERS)}; got an Observer instance")
    if not isinstance(net, (Net, NetBN)):
        raise TypeError(f"net must be a quantlab.models.Net or NetBN; got {type(net).__name__}")
    num_bits = check_num_bits(num_bits, "num_bits")
    per_channel, qat = check_bool(per_channel, "per_channel"), check_bool(qat, "qat")
    fixed_point = check_bool(fixed_point, "fixed_point")
    if output_bits is not None:
        output_bits = check_num_bits(output_bits, "output_bits")
    if averaging_constant is not None:
        averaging_constant = check_real(averaging_constant, "averaging_constant", 0, 1,
                                        low_open=True)
    for name, p in list(net.named_parameters()) + list(net.named_buffers()):
        check_tensor(p, f"net.{name}")  # meta tensors (no data) cannot be quantized
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"net.{name} holds NaN or inf: a float model to quantize must be "
                             "finite")
    from .learned import check_learn_ranges

    learn = check_learn_ranges(learn_ranges)
    if learn is not None and not qat:
        raise ValueError(f"learn_ranges={learn_ranges!r} learns ranges during quantization-aware "
                         "training: it needs qat=True")
    if averaging_constant is None and qat and learn is None:
        averaging_constant = 0.01
    # quantlab's qparams and observers are float32: a float64/float16 model is converted
    # (float16 -> float32 is exact; float64 -> float32 rounds each weight once)
    net = copy.deepcopy(net).float()
    kw = dict(num_bits=num_bits, per_channel=per_channel, fixed_point=fixed_point,
              averaging_constant=averaging_constant,
              multiplier=check_multiplier_formula(multiplier))
    if isinstance(net, NetBN):
        conv1 = QConvBNReLU(net.conv1, net.bn1, qi=True, qo=True, relu=True, **kw)
        conv2 = QConvBNReLU(net.conv2, net.bn2, qi=False, qo=True, relu=True, **kw)
    else:
        conv1 = QConv2d(net.conv1, True, True, relu=True, **kw)
        conv2 = QConv2d(net.conv2, False, True, relu=True, **kw)
    fc = QLinear(net.fc, False, True, **kw)
    if output_bits is not None and output_bits != num_bits:
        fc.q_out = QParam(output_bits, averaging_constant=averaging_constant)
    if learn is not None:
        _learn_ranges(conv1, conv2, fc, learn, observer, weight_observer)
    layers = [conv1, QMaxPool2d(2, 2, num_bits=num_bits), conv2,
              QMaxPool2d(2, 2, num_bits=num_bits), QFlatten(num_bits), fc]
    qnet = QuantizedNet(layers, num_bits, per_channel, fixed_point, qat)
    qnet.input_shape = (net.conv1.in_channels, 28, 28)  # the fc layer needs 28x28 images
    if learn is not None:
        qnet.default_lr = 3e-3  # the steps learn too: LSQ's recipe (benchmarks/bench_lsq.py)
    for layer in layers:
        # QAT's forward pass computes exactly what the integer model will: int32 bias and
        # requantization rounding (the calibration of PTQ keeps the plain fake quantization)
        layer.simulate_integer = qat and hasattr(layer, "link_input")
    for layer in (conv1, conv2, fc) if learn is None else ():
        if observer is not None and layer is not fc:  # hidden activations only
            layer.q_out.observer = make_observer(copy.deepcopy(observer), None, averaging_constant)
        if weight_observer is not None:
            layer.q_w.observer = make_observer(weight_observer, layer.q_w.axis,
                                               name="weight_observer", allowed=WEIGHT_OBSERVERS)
    if qat:
        # fine-tuning a trained model: BN statistics frozen, i.e. training folds BN exactly as
        # inference does (the last phase of the standard recipe; 2-bit NetBN measured 95% this
        # way, 91% with batch statistics)
        qnet.freeze_bn_stats(True)
    return qnet.train(qat)


def _learn_ranges(conv1, conv2, fc, method: str, observer, weight_observer):
    """Replace the layers' QParams by learned ones (``quantlab.learned.LearnedQParam``)."""
    import copy

    from .learned import LearnedQParam

    def like(q: QParam, method="lsq", per_image=True, obs="mse"):
        return LearnedQParam(q.num_bits, q.signed, q.symmetric, q.axis, method=method,
                             per_image=per_image, observer=copy.deepcopy(obs))

    act = "mse" if observer is None else observer
    conv1.q_in = like(conv1.q_in, obs=act)
    for layer in (conv1, conv2, fc):
        layer.q_w = like(layer.q_w, per_image=False,
                         obs="mse" if weight_observer is None else weight_observer)
    for layer in (conv1, conv2):  # after a fused ReLU: unsigned from 0
        layer.q_out = like(layer.q_out, method=method, obs=act)
    fc.q_out = like(fc.q_out, obs="minmax")  # logits: clipping the top one would create ties
