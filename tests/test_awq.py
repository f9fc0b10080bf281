"""AWQ: the folded float model is unchanged, alpha = 0 is round to nearest, the search never
does worse than round to nearest on its objective, planted outliers keep the float function."""

import torch

from quantlab.awq import awq_model, awq_search, fold_scales, plant_outliers
from quantlab.gptq import input_stats
from quantlab.models import TinyGPT
from quantlab.weight_only import dequantize_groups, quantize_groups


def _model(seed=0):
    torch.manual_seed(seed)
    model = TinyGPT(vocab_size=20, n_layers=2, d_model=32, n_heads=2, context=16).eval()
    with torch.no_grad():  # LayerNorms and biases away from their initial 1 and 0
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model, torch.randint(0, 20, (8, 16), generator=torch.Generator().manual_seed(seed))


def test_folding_awq_scales_leaves_the_float_model_unchanged():
    model, x = _model()
    scales = {f"blocks.{b}.{k}": torch.rand(32) * 3 + 0.2 for b in range(2)
              for k in ("qkv", "proj", "fc")}
    folded = fold_scales(model, scales)
    assert not torch.equal(folded.blocks[0].qkv.weight, model.blocks[0].qkv.weight)
    assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_awq_search_alpha_zero_is_rtn_and_the_choice_is_never_worse():
    model, x = _model(1)
    stats = input_stats(model, "blocks.0.fc", x)
    w = model.blocks[0].fc.weight
    found = awq_search(w, stats["xtx"], stats["mean_abs"], 3, 32)
    rtn = dequantize_groups(quantize_groups(w, 3, 32))
    from quantlab.gptq import output_error
    assert abs(found["rtn_error"] - output_error(w, rtn, stats["xtx"])) < 1e-12
    assert found["awq_error"] <= found["rtn_error"] and len(found["errors"]) == 20


def test_planted_outliers_are_bit_identical_in_float_and_awq_protects_them():
    model, x = _model(2)
    planted = plant_outliers(model, channels=(3, 7), factor=16.0)
    assert torch.equal(planted(x), model(x))  # x16 and /16 are exact in binary floating point
    ratio = input_stats(planted, "blocks.1.qkv", x)["mean_abs"]
    assert ratio[3] > 4 * ratio.median()
    qmodel, report = awq_model(planted, x, bits=3, group_size=32)
    assert torch.allclose(report["folded"](x), planted(x), atol=1e-4, rtol=1e-4)
    for name, r in report["layers"].items():
        assert r["awq_error"] <= r["rtn_error"], name
    assert max(report["layers"][f"blocks.{b}.qkv"]["alpha"] for b in range(2)) > 0


def test_attention_search_alpha_zero_is_rtn_and_leaves_the_block_unchanged():
    from quantlab.awq import awq_search_attention, layer_inputs
    model, x = _model(3)
    block = model.blocks[0]
    w = block.qkv.weight.detach().clone()
    xs = layer_inputs(model, "blocks.0.qkv", x)
    assert xs.shape == (8, 16, 32)
    stats = input_stats(model, "blocks.0.qkv", x)
    found = awq_search_attention(block, xs, stats["mean_abs"], 3, 32)
    assert torch.equal(block.qkv.weight, w)  # the search restores the weight
    ref = block.attention(xs)
    block.qkv.weight.data = dequantize_groups(quantize_groups(w, 3, 32))
    rtn = ((block.attention(xs) - ref).double() ** 2).sum() / (ref.double() ** 2).sum()
    block.qkv.weight.data = w
    assert abs(found["rtn_error"] - rtn.item()) < 1e-9 and found["awq_error"] <= found["rtn_error"]
