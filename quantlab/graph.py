"""The quantized graph model: quantized layers wired as the float model's ``torch.fx`` graph.

:func:`quantlab.convert.quantize_model` builds a :class:`QuantizedNet` from any supported model
(``Net`` and ``NetBN`` are two inputs like any other). It keeps its layers in graph order in
``layers`` and the wiring in ``steps``, and runs them in three modes:

- ``forward(x)``: float with fake quantization (calibration, QAT; with ``simulate_integer`` the
  weighted layers return exactly the integer model's values);
- ``freeze()``: each layer takes its inputs' QParams and computes its integers;
- ``integer_inference(q_x)`` / ``quantize_inference(x)``: integer arithmetic only.

Taught in notebooks ``d_post_training_quantize`` (Net) and ``h_your_own_model`` (a ResNet).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ._validate import (
    check_bool,
    check_float_tensor,
    check_int,
    check_iterable_of_batches,
    images_and_labels,
)
from .modules import (
    QConvBNReLU,
    QModule,
    _QWeighted,
    calibration_mode,
    check_integer_input,
    check_multiplier_formula,
)
from .observer import QParam
from .ops import QAdd, QCat, QInput


@dataclass
class Step:
    """One node of the quantized graph: ``kind`` is 'layer' (``layers[index]``), 'shape' (a
    shape function applied as-is to float or integer tensors) or 'alias' (pass-through)."""
    name: str
    kind: str
    index: int = -1
    fn: object = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    #: the integer step computes a conv with this max-pool on its accumulators (same integers)
    pool_of: str | None = None


def _refs(args):
    """Names of the graph values used in (nested) args ('%name')."""
    out = []
    for a in args:
        if isinstance(a, str) and a.startswith("%"):
            out.append(a[1:])
        elif isinstance(a, (list, tuple)):
            out.extend(_refs(a))
    return out


def _subst(args, values):
    """args with each '%name' replaced by ``values[name]``."""
    if isinstance(args, str) and args.startswith("%"):
        return values[args[1:]]
    if isinstance(args, (list, tuple)):
        return type(args)(_subst(a, values) for a in args)
    if isinstance(args, dict):
        return {k: _subst(v, values) for k, v in args.items()}
    return args


class QuantizedNet(nn.Module):
    """A quantized graph model built by :func:`quantlab.convert.quantize_model`.

    ``forward(x)`` runs fake quantization on float images (calibration, QAT);
    ``calibrate(data)`` observes ranges; ``freeze()``; ``quantize_inference(x)`` runs the integer
    layers on float images and returns dequantized outputs; ``integer_inference(q_x)`` maps the
    input integers to the output integers. ``layers`` holds the quantized layers in graph order,
    ``steps`` the graph (without ``steps``, the layers form a chain).
    """

    def __init__(self, layers: list[nn.Module], num_bits: int, per_channel: bool,
                 fixed_point: bool, qat: bool, steps: list[Step] | None = None,
                 input_name: str = "x", output_name: str | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, QModule) and not getattr(layer, "qname", None):
                layer.qname = f"layers[{i}] ({type(layer).__name__})"  # names it in errors
        self.num_bits, self.per_channel = num_bits, per_channel
        self.fixed_point, self.qat = fixed_point, qat
        if steps is None:  # a plain chain of layers
            steps, prev = [], input_name
            for i in range(len(layers)):
                steps.append(Step(f"layer{i}", "layer", i, args=("%" + prev,)))
                prev = f"layer{i}"
            output_name = prev
        self.steps, self.input_name, self.output_name = steps, input_name, output_name
        self._qsource = self._trace_qparams()
        #: max-pool step name -> the conv step whose accumulators it pools (integer inference)
        self._pool_fused = {s.pool_of: s for s in steps if s.pool_of is not None}
        self.link_inputs()
        if qat:
            # fine-tuning from a trained float model: a third of its peak learning rate, and no
            # shift augmentation (measured best at 2-4 bits on the embedded digits)
            self.default_lr, self.default_augment = 1e-3, 0

    def link_inputs(self):
        """Let each weighted layer without its own input QParam read its input's live QParam in
        the forward pass (the one freeze() will copy into its q_in): QAT's integer simulation."""
        for step in self.steps:
            layer = self.layers[step.index] if step.kind == "layer" else None
            if isinstance(layer, _QWeighted) and not layer.qi:
                layer.link_input(self._qparam(_refs(step.args)[0]))

    # -- where each value's qparams live ------------------------------------------------------
    def _trace_qparams(self) -> dict:
        """value name -> (layer index, 'q_in' | 'out'): the QParam describing that value."""
        src = {}
        for step in self.steps:
            ins = _refs(step.args)
            if step.kind == "layer":
                layer = self.layers[step.index]
                if self.input_name in ins and getattr(layer, "qi", False):
                    src[self.input_name] = (step.index, "q_in")
                if isinstance(layer, (_QWeighted, QAdd, QCat)):
                    src[step.name] = (step.index, "out")
                elif isinstance(layer, QInput):
                    src[step.name] = (step.index, "q_in")
                else:  # shares its input's qparams
                    src[step.name] = src.get(ins[0])
            elif ins:
                src[step.name] = src.get(ins[0])
        return src

    def _qparam(self, name: str) -> QParam | None:
        where = self._qsource.get(name)
        if where is None:
            return None
        layer = self.layers[where[0]]
        return layer.q_in if where[1] == "q_in" else layer.output_qparam

    @property
    def q_in(self) -> QParam:
        """The QParam of the input images."""
        return self._qparam(self.input_name)

    @property
    def q_out(self) -> QParam:
        """The QParam of the model's output (the logits)."""
        return self._qparam(self.output_name)

    @property
    def frozen(self) -> bool:
        return all(layer.frozen for layer in self.layers if isinstance(layer, QModule))

    # -- running the graph --------------------------------------------------------------------
    def _layer_steps(self, values: dict):
        """Walk the steps in order, computing aliases and shape steps into ``values``; yield
        ``(step, layer, args)`` for each layer step, whose caller stores its output."""
        for step in self.steps:
            if step.kind == "alias":
                values[step.name] = values[_refs(step.args)[0]]
                continue
            args = _subst(step.args, values)
            if step.kind == "shape":
                values[step.name] = step.fn(*args, **_subst(step.kwargs, values))
                continue
            yield step, self.layers[step.index], args

    def _forward_step(self, step, layer, args):
        """One layer step of ``forward`` (fake-quantized float values)."""
        if getattr(layer, "takes_input_qparam", False):   # its output keeps its input's grid
            return layer(args[0], self._qparam(_refs(step.args)[0]))
        return layer(*args)

    def _run(self, x: torch.Tensor, integer: bool, keep: bool = False):
        values = {self.input_name: x}
        for step, layer, args in self._layer_steps(values):
            if not integer:
                values[step.name] = self._forward_step(step, layer, args)
            elif step.pool_of is not None:
                values[step.name] = None  # computed by the max-pool that follows (pool_of)
            elif step.name in self._pool_fused:
                conv_step = self._pool_fused[step.name]
                conv = self.layers[conv_step.index]
                q_x = values[_refs(conv_step.args)[0]]
                values[step.name] = conv.quantize_inference(
                    q_x, pool=(layer.kernel_size, layer.stride or layer.kernel_size))
            else:
                values[step.name] = layer.quantize_inference(*args)
        return values if keep else values[self.output_name]

    def layer_inputs(self, x: torch.Tensor, index: int, compute=None) -> tuple:
        """The arguments the graph passes to ``layers[index]`` when it runs on ``x``: the steps
        before it are computed as ``forward`` does (fake-quantized), or by ``compute(layer,
        args)`` when given; it stops there. Follows the graph, so a layer on one branch gets its
        own branch's output (PTQ methods that work layer by layer use it)."""
        index = check_int(index, "index", 0)
        values = {self.input_name: x}
        for step, layer, args in self._layer_steps(values):
            if step.index == index:
                return tuple(args)
            values[step.name] = compute(layer, args) if compute is not None else \
                self._forward_step(step, layer, args)
        raise ValueError(f"index must be the index of one of the {len(self.layers)} layers of "
                         f"the graph; got {index}")

    def _check_images(self, x: torch.Tensor, name: str):
        """A batch of inputs of the shape the model was built for (``input_shape``; without
        one, any batch (N, ...))."""
        shape = getattr(self, "input_shape", None)
        if shape is None:
            if x.dim() < 2:
                raise ValueError(f"{name} must be a batch (N, ...) of inputs; got "
                                 f"{tuple(x.shape)}")
            return
        if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
            want = f"(N, {', '.join(map(str, shape))})"
            raise ValueError(f"{name} must be a batch of images of shape {want}; got "
                             f"{tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            self._check_images(x, "x")
        return self._run(x, integer=False)

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
        """Freeze every layer in graph order, feeding each its inputs' QParams.

        Args:
            multiplier: ``"qnnpack"`` or ``"onnxruntime"``, the formula of the float32
                requantization multipliers of the conv/linear layers (None: as given to
                ``quantize_model``).

        The model is left in eval mode; if a layer refuses (e.g. a bias that does not fit the
        int32 bias), the previous train/eval mode is restored and the error names the layer.
        """
        if multiplier is not None:
            check_multiplier_formula(multiplier)
        was_training = self.training
        self.eval()
        try:
            for step in self.steps:
                if step.kind == "layer":
                    try:
                        self._freeze_step(step, multiplier)
                    except (ValueError, RuntimeError) as e:
                        label = self.layers[step.index].label()
                        if label in str(e):
                            raise
                        raise type(e)(f"{label}: {e}") from e
        except BaseException:
            self.train(was_training)
            raise
        return self

    def _freeze_step(self, step: Step, multiplier: str | None):
        layer = self.layers[step.index]
        ins = [self._qparam(n) for n in _refs(step.args)]
        if isinstance(layer, QAdd):
            layer.freeze(ins[0], ins[1])
        elif isinstance(layer, QCat):
            layer.freeze(ins)
        elif isinstance(layer, QInput):
            layer.freeze()
        elif isinstance(layer, _QWeighted):
            layer.freeze(q_in=None if layer.qi else ins[0], multiplier=multiplier)
        else:
            if ins[0] is None:
                raise RuntimeError(f"{layer.label()} has no quantized input")
            layer.freeze(q_in=ins[0])

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
        """int32 input integers -> int32 output integers, integer arithmetic only.

        A max-pool that is a conv's only consumer is applied to the conv's accumulators (same
        integers, faster). Large batches are processed in chunks of ``chunk_size`` images.
        """
        self._check_frozen()
        check_integer_input(q_x, self.q_in)
        self._check_images(q_x, "q_x")
        if q_x.shape[0] > self.chunk_size:
            return torch.cat([self._run(c, integer=True) for c in q_x.split(self.chunk_size)])
        return self._run(q_x, integer=True)

    @torch.no_grad()
    def integer_values(self, q_x: torch.Tensor) -> dict:
        """Every intermediate integer tensor of ``integer_inference(q_x)``, by graph node name
        (the step names of ``steps``; a conv fused with its max-pool appears as the pool)."""
        self._check_frozen()
        check_integer_input(q_x, self.q_in)
        self._check_images(q_x, "q_x")
        values = self._run(q_x, integer=True, keep=True)
        return {k: v for k, v in values.items() if v is not None}

    def qparam_of(self, name: str) -> QParam:
        """The QParam of the graph value ``name`` (a step name, or the input's name)."""
        q = self._qparam(name) if isinstance(name, str) else None
        if q is None:
            names = [self.input_name] + [s.name for s in self.steps if self._qparam(s.name)]
            raise KeyError(f"name must be a graph value with qparams, one of {names}; got "
                           f"{name!r}")
        return q

    @torch.no_grad()
    def quantize_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Float images -> quantize with ``q_in`` -> integer layers -> dequantized float output."""
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

