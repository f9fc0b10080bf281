"""The float models: the MNIST CNN of the original series, a BatchNorm variant, a small ResNet.

``Net``: Conv2d(1,40,3,1) -> ReLU -> MaxPool2d(2,2) -> Conv2d(40,40,3,1,groups=20) -> ReLU ->
MaxPool2d(2,2) -> flatten -> Linear(5*5*40, 10). ``NetBN`` adds BatchNorm2d after each conv.
Taught in notebook ``b_model``. ``TinyGPT``: the character-level transformer of lessons i and j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """The original's CNN: 11,170 parameters, (N, 1, 28, 28) -> (N, 10) logits."""

    def __init__(self, num_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(num_channels, 40, 3, 1)
        self.conv2 = nn.Conv2d(40, 40, 3, 1, groups=20)
        self.fc = nn.Linear(5 * 5 * 40, 10)
        self.input_shape = (num_channels, 28, 28)  # the fc layer needs 28x28 images

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
        self.input_shape = (num_channels, 28, 28)  # the fc layer needs 28x28 images

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2, 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2, 2)
        return self.fc(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-BN-ReLU, conv-BN, plus the shortcut, then ReLU.

    The shortcut is the input itself, or a 1x1 conv + BN when the shape changes (stride or
    channels), as in torchvision's ResNet.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)  # the residual add


class ResNet(nn.Module):
    """A small ResNet for 28x28 digits: a conv stem with max-pooling, three basic blocks, global
    average pooling and a linear classifier; (N, 1, 28, 28) -> (N, 10) logits.

    stem 16 ch (28x28 -> pool -> 14x14) -> block 16 -> block 32 (stride 2, 7x7) -> block 32 ->
    global average pool -> Linear(32, 10). Taught in notebook ``h_your_own_model``.
    """

    def __init__(self, num_channels: int = 1, widths: tuple[int, int] = (16, 32)):
        super().__init__()
        w1, w2 = widths
        self.conv1 = nn.Conv2d(num_channels, w1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(w1, w1)
        self.layer2 = BasicBlock(w1, w2, stride=2)
        self.layer3 = BasicBlock(w2, w2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: ``x + proj(attn(ln1(x)))``, then
    ``x + fc2(gelu(fc(ln2(x))))``; the four Linears are ``qkv``, ``proj``, ``fc``, ``fc2``."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)
        self.kv_quantizer = None  # (k, v) -> (k, v): a quantized KV cache (quantlab.act_quant)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        if self.kv_quantizer is not None:
            k, v = self.kv_quantizer(k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(QK^T/sqrt(d_h)) V
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A character-level decoder-only transformer (GPT-2's shape, Radford et al. 2019).

    Token and learned position embeddings -> ``n_layers`` pre-LN :class:`Block` s (causal
    self-attention with ``n_heads`` heads, GELU MLP of width 4 d) -> final LayerNorm -> logits by
    the transposed token embedding (the head is tied to it). No dropout. With the defaults
    (vocab 103, 4 layers, d 128, 4 heads, context 128): 822,912 parameters, 786,432 of them the
    weights of the 16 Linears. (B, T) int64 ids, T <= context -> (B, T, vocab) logits.
    Taught in notebook ``i_low_bit_weights``.
    """

    def __init__(self, vocab_size: int = 103, n_layers: int = 4, d_model: int = 128,
                 n_heads: int = 4, context: int = 128):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model must be a multiple of n_heads; got {d_model} and {n_heads}")
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        # GPT-2's initialisation: N(0, 0.02), the residual outputs scaled by 1/sqrt(2 n_layers)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                std = 0.02 / (2 * n_layers) ** 0.5 if name.endswith(("proj.weight", "fc2.weight")) \
                    else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"idx holds {t} positions; the context is {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.T  # the tied head


MODELS = {"net": Net, "netbn": NetBN, "resnet": ResNet}


# whole-model quantization lives in quantlab.convert (any traceable model); re-exported here
from .convert import quantize_model  # noqa: E402, F401
from .graph import QuantizedNet  # noqa: E402, F401
