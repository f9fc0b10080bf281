"""The passes of quantize_model, each alone: trace, classify, check_graph, match, lower,
fuse_conv_maxpool; and the table of patterns they read (quantlab.patterns)."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantlab import patterns
from quantlab.graph import Step
from quantlab.modules import QConv2d, QConvBNReLU, QFlatten, QLinear, QMaxPool2d
from quantlab.ops import QAdd, QReLU6
from quantlab.passes import (
    Context,
    UnsupportedModelError,
    check_graph,
    classify,
    fuse_conv_maxpool,
    lower,
    match,
    trace,
)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 7 * 7, 10)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = F.max_pool2d(y, 2)
        z = self.conv2(y).relu()
        y = F.relu(y + z)
        y = F.hardtanh(F.max_pool2d(y, 2), 0.0, 6.0)
        return self.fc(y.flatten(1))


def _ctx(gm):
    return Context(dict(gm.named_modules()), 8, None,
                   dict(num_bits=8, per_channel=True, fixed_point=False, averaging_constant=None,
                        multiplier="qnnpack"))


def test_trace_records_in_place_adds():
    class M(nn.Module):
        def forward(self, x):
            x += 1
            return x
    gm = trace(M())
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [operator.iadd]


def test_trace_names_an_untraceable_model():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x
    with pytest.raises(UnsupportedModelError, match="could not trace Branchy"):
        trace(Branchy())


def test_classify_gives_every_spelling_its_kind():
    gm = trace(Block())
    kinds = {n.name: k for n, k in classify(gm).items()}
    assert kinds == {"conv": "conv", "bn": "bn", "relu": "relu", "max_pool2d": "maxpool",
                     "conv2": "conv", "relu_1": "relu", "add": "add", "relu_2": "relu",
                     "max_pool2d_1": "maxpool", "hardtanh": "relu6", "flatten": "flatten",
                     "fc": "linear"}


def test_every_spelling_in_the_table_is_classified_as_its_kind():
    # each module class of OPS, built with defaults where it can be, is its row's kind
    for op in patterns.OPS:
        for cls in op.modules:
            args = {nn.Conv2d: (1, 1, 1), nn.BatchNorm2d: (1,), nn.Linear: (1, 1),
                    nn.MaxPool2d: (2,), nn.AvgPool2d: (2,), nn.AdaptiveAvgPool2d: (1,),
                    nn.Hardtanh: (0.0, 6.0) if op.kind == "relu6" else (-1.0, 2.0)}.get(cls, ())
            module = cls(*args)
            node = type("N", (), {"op": "call_module", "target": "m", "args": (), "kwargs": {}})()
            assert patterns.op_kind(node, {"m": module}) == op.kind, (cls, op.kind)


def test_check_graph_refuses_by_node_name():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y * torch.sigmoid(y)
    gm = trace(Gated())
    with pytest.raises(UnsupportedModelError, match=r"node 'sigmoid' \(call_function sigmoid\)\. "
                                                    r"Supported: Conv2d \(\+BatchNorm2d\)"):
        check_graph(gm, classify(gm))


def test_check_graph_refuses_two_inputs_and_tuple_outputs():
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y

    class Pair(nn.Module):
        def forward(self, x):
            return x, x
    for model, msg in ((Two(), "one input"), (Pair(), "returns one tensor")):
        gm = trace(model)
        with pytest.raises(UnsupportedModelError, match=msg):
            check_graph(gm, classify(gm))


def test_match_covers_the_graph_with_the_longest_rows():
    gm = trace(Block())
    kinds = classify(gm)
    check_graph(gm, kinds)
    found = [(m.row.chain, [n.name for n in m.nodes]) for m in match(gm, kinds, _ctx(gm))]
    assert found == [(("conv", "bn", "relu"), ["conv", "bn", "relu"]),
                     (("maxpool",), ["max_pool2d"]),
                     (("conv", "relu"), ["conv2", "relu_1"]),
                     (("add", "relu"), ["add", "relu_2"]),
                     (("maxpool",), ["max_pool2d_1"]),
                     (("relu6",), ["hardtanh"]),
                     (("flatten",), ["flatten"]),
                     (("linear",), ["fc"])]


def test_match_refuses_a_batchnorm_that_follows_no_conv():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y            # the conv has two users: BN cannot be folded
    gm = trace(M())
    kinds = classify(gm)
    with pytest.raises(UnsupportedModelError, match="BatchNorm2d is only supported right after"):
        match(gm, kinds, _ctx(gm))


def test_lower_builds_one_layer_per_match_named_after_its_last_node():
    gm = trace(Block())
    kinds = classify(gm)
    ctx = _ctx(gm)
    layers, steps = [], []
    lower(match(gm, kinds, ctx), ctx, layers, steps)
    assert [type(layer) for layer in layers] == [QConvBNReLU, QMaxPool2d, QConv2d, QAdd,
                                                 QMaxPool2d, QReLU6, QFlatten, QLinear]
    assert layers[0].relu and layers[2].relu and layers[3].relu
    assert [s.name for s in steps if s.kind == "layer"][:4] == ["relu", "max_pool2d", "relu_1",
                                                                "relu_2"]
    assert steps[3].args == ("%max_pool2d", "%relu_1")   # the add reads the pool and the conv


def test_lower_names_the_refused_argument():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return F.max_pool2d(self.conv(x), 2, dilation=2)
    gm = trace(M())
    kinds = classify(gm)
    ctx = _ctx(gm)
    with pytest.raises(UnsupportedModelError, match="node 'max_pool2d'.*dilation"):
        lower(match(gm, kinds, ctx), ctx, [], [])


def test_fuse_conv_maxpool_marks_only_an_unpadded_pool_that_is_the_conv_s_only_user():
    conv = QConv2d(nn.Conv2d(1, 2, 3))
    layers = [conv, QMaxPool2d(2), QMaxPool2d(3, padding=1)]
    steps = [Step("c", "layer", 0, args=("%x",)), Step("p", "layer", 1, args=("%c",)),
             Step("p2", "layer", 2, args=("%p",))]
    fuse_conv_maxpool(layers, steps, output_name="p2")
    assert steps[0].pool_of == "p" and steps[1].pool_of is None
    steps = [Step("c", "layer", 0, args=("%x",)), Step("p", "layer", 1, args=("%c",)),
             Step("s", "shape", fn=torch.flatten, args=("%c", 1))]   # a second user of c
    fuse_conv_maxpool(layers, steps, output_name="p")
    assert steps[0].pool_of is None


def test_supported_lists_every_root_of_the_table_once():
    line = patterns.supported()
    roots = list(dict.fromkeys(row.chain[0] for row in patterns.PATTERNS))
    assert line.count(", ") + 1 >= len(roots)
    for root in roots:
        assert patterns.spellings(root)[0] in line
    assert line.startswith("Conv2d (+BatchNorm2d) (+ReLU/ReLU6), Linear (+ReLU), ")
