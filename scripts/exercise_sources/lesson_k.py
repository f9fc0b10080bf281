"""Exercises of lesson k (k_activations): statements, stubs, worked solutions, and the mistakes the
checker must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="k_activations",
    title="k · Exercises: activation scales, SmoothQuant, LLM.int8() and the KV cache (练习: 激活量化)",
    goal="Write the pieces of W8A8 that lesson k measures on the tiny GPT: an activation fake-quantized with one "
         "scale per token or one static scale per tensor, SmoothQuant's per-channel scales and their fold into the "
         "input and the weight, LLM.int8()'s product with the outlier columns in float and the rest in 8 bits, and "
         "the bytes a quantized KV cache holds per token. The checker compares them with PyTorch's fake-quantize "
         "kernels and with `quantlab.act_quant`.",
    setup='''\
# setup: torch and the checker
import torch

from quantlab import check''',
    exercises=[
        ex(1, "fake_quantize_activations", "one scale per token, or one static scale per tensor",
           r"""
           Lesson k, section 2. An activation `x` (tokens, channels), float32, one row per token, goes on the symmetric
           grid with $q_{max} = 2^{b-1} - 1$ for $b$ = `bits` (127 at 8 bits, 7 at 4 bits) and comes back as float:
           $$ S = \frac{m}{q_{max}}, \qquad q = \mathrm{clamp}\big(\mathrm{round}(x \cdot \tfrac{1}{S}),\ -q_{max},\ q_{max}\big), \qquad \hat x = S\,q $$
           - `absmax=None`: **per token** (dynamic): one $S$ per row, $m$ = that row's largest magnitude $\max_j |x_{tj}|$.
             An all-zero row has $S = 0$ and gives zeros (no 0/0);
           - `absmax` a number $> 0$: **per tensor, static**: one $S$ for the whole tensor from the calibrated $m$ =
             `absmax`; values beyond $\pm m$ are clipped to $\pm q_{max} S$.

           Compute in float32 with the float32 reciprocal $1/S$ (as PyTorch's fake-quantize kernels and quantlab do),
           rounding half to even (`torch.round`). Return $\hat x$, float32, of `x`'s shape. The checker compares it with
           `torch.fake_quantize_per_channel_affine` (one scale per row, zero point 0) and
           `torch.fake_quantize_per_tensor_affine`.""",
           '''
           def fake_quantize_activations(x, bits=8, absmax=None):
               """x (tokens, channels) on the symmetric bits-bit grid and back: per token, or static per tensor."""''',
           '''
           q_max = 2 ** (bits - 1) - 1
           if absmax is None:
               m = x.abs().amax(dim=1, keepdim=True)          # per token: each row's largest |x|
           else:
               m = torch.tensor(absmax, dtype=torch.float32)  # static: the calibrated max|x|
           scale = m / q_max                                   # float32
           inv = torch.where(scale > 0, 1.0 / scale, 0.0)     # an all-zero row: q = 0, no 0/0
           q = torch.clamp(torch.round(x * inv), -q_max, q_max)
           return q * scale'''),
        ex(2, "smoothquant", "SmoothQuant's scales and their fold",
           r"""
           Lesson k, section 4.2. From the calibration inputs `x` (N, in) of a Linear with weight `w` (out, in), per input
           channel $j$:
           $$ s_j = \frac{\big(\max_n |x_{nj}|\big)^{\alpha}}{\big(\max_i |w_{ij}|\big)^{1-\alpha}} $$
           the largest magnitude of input channel $j$ over the N rows, and of weight column $j$ over the out rows. A
           channel where either maximum is 0 gets $s_j = 1$ (there is nothing to balance, and no 0/0). Then fold:
           $\tilde x = x\,\mathrm{diag}(s)^{-1}$ (column $j$ of `x` divided by $s_j$) and $\tilde w = w\,\mathrm{diag}(s)$
           (column $j$ of `w` times $s_j$), so that $\tilde x \tilde w^\top = x w^\top$: the float product is unchanged, and
           with $\alpha = 0.5$ input channel $j$ and weight column $j$ end with the same largest magnitude.

           Return `(s, x_smooth, w_smooth)`, float32, `s` of shape (in,). The checker compares them with
           `quantlab.act_quant.smoothquant_scales` within a relative $10^{-5}$.""",
           '''
           def smoothquant(x, w, alpha=0.5):
               """(s, x / s, w * s): SmoothQuant's per-input-channel scales and the folded input and weight."""''',
           '''
           x_max = x.abs().amax(dim=0)                          # (in,): each input channel over the N rows
           w_max = w.abs().amax(dim=0)                          # (in,): each weight column over the out rows
           s = x_max ** alpha / w_max ** (1 - alpha)
           s = torch.where((x_max > 0) & (w_max > 0), s, 1.0)  # nothing to balance: s = 1
           return s, x / s, w * s                              # s broadcasts along the last dim: the columns'''),
        ex(3, "llm_int8_linear", "the outlier columns in float, the rest in 8 bits (LLM.int8())",
           r"""
           Lesson k, section 4.1: LLM.int8()'s decomposition of a Linear without bias, $y = x w^\top$, with `x` (tokens, in)
           and `w` (out, in), float32.
           1. **The weight**, quantized once, before any input is seen: symmetric 8 bits per output channel (row of `w`), as
              ONNX Runtime stores int8 weights (section 3.1): $S_w = \max_j |w_{ij}| / 127$ over the **whole** row, in
              float32, $q = \mathrm{clamp}(\mathrm{round}(w / S_w), -127, 127)$ (a division, half to even; an all-zero row
              gives $q = 0$), dequantized as $\hat w = S_w\, q$ with the float32 scale.
           2. **Outlier columns**: input column $j$ is an outlier when $|x_{tj}| >$ `threshold` for **some** token $t$
              (strictly greater; a negative value counts by its magnitude).
           3. **Float part**: the outlier columns of `x` times the same columns of the **float** weight `w`.
           4. **8-bit part**: `x` with its outlier columns set to 0, fake-quantized **per token** at 8 bits (your
              `fake_quantize_activations` of k1), times $\hat w^\top$.

           Return $y$ = float part + 8-bit part, float32 (tokens, out). The checker compares it with
           `quantlab.act_quant.ActQuantLinear(linear, 8, 8, "token", outlier_threshold=threshold)` within float rounding.""",
           '''
           def llm_int8_linear(x, w, threshold=6.0):
               """y = x @ w.T (tokens, out): outlier columns of x in float, the others W8A8."""''',
           '''
           w_scale = w.abs().amax(dim=1, keepdim=True) / 127     # per output row, over the whole row
           safe = torch.where(w_scale > 0, w_scale, 1.0)         # an all-zero row: codes 0
           w_hat = torch.clamp(torch.round(w / safe), -127, 127) * w_scale
           outliers = (x.abs() > threshold).any(dim=0)           # (in,): some token's |x| exceeds it
           y_float = x[:, outliers] @ w[:, outliers].T           # those columns in float, float weight
           x_rest = torch.where(outliers, 0.0, x)                # the other columns ...
           x_hat = fake_quantize_activations(x_rest, 8)          # ... per token at 8 bits (k1)
           return y_float + x_hat @ w_hat.T'''),
        ex(4, "kv_cache_bytes_per_token", "the bytes of a quantized KV cache",
           r"""
           Lesson k, section 6. A model of `n_layers` layers of width $d$ = `d_model` with `n_heads` heads caches, in every
           layer, one key and one value vector of $d$ numbers per token. Count the bytes per token:
           - `bits=None`: float16, 2 bytes per number;
           - `bits` = $b$: each number is a $b$-bit code ($b/8$ bytes), and each grid has a float16 scale (2 bytes) and a
             $b$-bit zero point ($b/8$ bytes). Keys use the grids of `key_axis`, values those of `value_axis`:
             - `"token"`: one grid per head in each token (over the head's $d$ / `n_heads` channels): `n_heads` grids per
               token;
             - `"channel"`: one grid per channel over each group of `group` consecutive tokens (KIVI's layout):
               $d$ / `group` grids per token, on average.

           Return the bytes per token as a Python float (fractions of a byte are fine: it is an average). The checker
           compares it with `quantlab.act_quant.kv_cache_bytes_per_token`.""",
           '''
           def kv_cache_bytes_per_token(n_layers, d_model, n_heads, bits, key_axis="channel", value_axis="token",
                                        group=32):
               """Bytes per token of the keys and values of every layer: codes, float16 scales, zero points."""''',
           '''
           if bits is None:
               return 2 * n_layers * d_model * 2.0                  # keys and values, float16
           total = 0.0
           for axis in (key_axis, value_axis):                      # the keys, then the values
               codes = d_model * bits / 8                           # d codes of bits bits
               grids = n_heads if axis == "token" else d_model / group
               total += codes + grids * (2 + bits / 8)              # a float16 scale, a bits-bit zero point
           return n_layers * total'''),
    ])

#: (exercise, text in its solution, the mistake, words its hint must contain)
MISTAKES: list[Mistake] = [
    Mistake('fake_quantize_activations', 'm = x.abs().amax(dim=1, keepdim=True)',
            'm = x.abs().amax()',
            'one scale per row', 'per tensor (dynamic)'),
    Mistake('fake_quantize_activations', 'm = x.abs().amax(dim=1, keepdim=True)',
            'm = x.abs().amax(dim=0, keepdim=True)',
            'not over each column', 'per channel'),
    Mistake('fake_quantize_activations', 'm = x.abs().amax(dim=1, keepdim=True)',
            'm = x.amax(dim=1, keepdim=True)',
            'largest magnitude', 'max instead of max|x|'),
    Mistake('fake_quantize_activations', 'q_max = 2 ** (bits - 1) - 1',
            'q_max = 2 ** (bits - 1)',
            'q_max = 2**(bits-1) - 1', 'q_max 128'),
    Mistake('fake_quantize_activations', 'torch.round(x * inv)',
            'torch.trunc(x * inv)',
            'not truncate', 'truncation'),
    Mistake('fake_quantize_activations', 'torch.round(x * inv)',
            'torch.floor(x * inv + 0.5)',
            'round half to even', 'ties up'),
    Mistake('fake_quantize_activations', 'torch.round(x * inv)',
            'torch.round(x / scale)',
            'float32 reciprocal', 'divides by S'),
    Mistake('fake_quantize_activations', 'q = torch.clamp(torch.round(x * inv), -q_max, q_max)',
            'q = torch.round(x * inv)',
            'clip', 'no clamp'),
    Mistake('fake_quantize_activations', 'inv = torch.where(scale > 0, 1.0 / scale, 0.0)',
            'inv = 1.0 / scale',
            'all-zero row', '0/0 = nan'),
    Mistake('fake_quantize_activations', 'm = torch.tensor(absmax, dtype=torch.float32)',
            'm = x.abs().amax()',
            'the calibrated absmax', 'static scale ignored'),
    Mistake('fake_quantize_activations', 'return q * scale',
            'return q',
            'dequantize', 'integers returned'),
    Mistake('smoothquant', 's = x_max ** alpha / w_max ** (1 - alpha)',
            's = x_max ** (1 - alpha) / w_max ** alpha',
            'alpha goes with the activations', 'alpha and 1 - alpha swapped'),
    Mistake('smoothquant', 's = x_max ** alpha / w_max ** (1 - alpha)',
            's = (x_max / w_max) ** alpha',
            'exponent 1 - alpha', '(x / w) ** alpha'),
    Mistake('smoothquant', 'x_max = x.abs().amax(dim=0)',
            'x_max = x.amax(dim=0)',
            'largest magnitude of input channel', 'max x, not max|x|'),
    Mistake('smoothquant', 'w_max = w.abs().amax(dim=0)',
            'w_max = w.amax(dim=0)',
            'largest magnitude of weight column', 'max w, not max|w|'),
    Mistake('smoothquant', 'x_max = x.abs().amax(dim=0)',
            'x_max = x.abs().mean(dim=0)',
            'not the mean', "AWQ's mean |x|"),
    Mistake('smoothquant', 'x_max = x.abs().amax(dim=0)',
            'x_max = x.abs().amax(dim=1)',
            'over the N rows', 'max over each row'),
    Mistake('smoothquant', 'w_max = w.abs().amax(dim=0)',
            'w_max = w.abs().amax(dim=1)',
            'over its out rows', 'max over each weight row'),
    Mistake('smoothquant', 'return s, x / s, w * s',
            'return s, x * s, w / s',
            'divide the input', 'fold the wrong way'),
    Mistake('smoothquant', 'return s, x / s, w * s',
            'return s, x / s, w * s[:, None]',
            'columns of w', 'rows of w scaled'),
    Mistake('smoothquant', 's = torch.where((x_max > 0) & (w_max > 0), s, 1.0)',
            '',
            's = 1', 'zero channel: nan'),
    Mistake('llm_int8_linear', '(x.abs() > threshold).any(dim=0)',
            '(x.abs().mean(dim=0) > threshold)',
            'in any token', 'threshold on the mean'),
    Mistake('llm_int8_linear', '(x.abs() > threshold).any(dim=0)',
            '(x > threshold).any(dim=0)',
            'magnitude', 'negative outliers missed'),
    Mistake('llm_int8_linear', '(x.abs() > threshold).any(dim=0)',
            '(x.abs() >= threshold).any(dim=0)',
            'strictly', '>= threshold'),
    Mistake('llm_int8_linear', 'x_rest = torch.where(outliers, 0.0, x)',
            'x_rest = x',
            'set the outlier columns to 0', 'outliers in the 8-bit part too'),
    Mistake('llm_int8_linear', 'y_float = x[:, outliers] @ w[:, outliers].T',
            'y_float = x[:, outliers] @ w_hat[:, outliers].T',
            'the float weight', 'float part with the 8-bit weight'),
    Mistake('llm_int8_linear', 'fake_quantize_activations(x_rest, 8)',
            'fake_quantize_activations(x_rest, 8, absmax=float(x_rest.abs().max()))',
            'per token', 'one activation scale per call'),
    Mistake('llm_int8_linear', 'w_scale = w.abs().amax(dim=1, keepdim=True) / 127',
            'w_scale = w.abs().amax() / 127',
            'per output channel', 'one weight scale'),
    Mistake('llm_int8_linear', 'w_scale = w.abs().amax(dim=1, keepdim=True) / 127',
            'w_scale = torch.where((x.abs() > threshold).any(dim=0), 0.0, w).abs().amax(dim=1, keepdim=True) / 127',
            'whole row', 'weight scale without the outlier columns'),
    Mistake('llm_int8_linear', '-127, 127) * w_scale',
            '-127, 127) * w_scale.half().float()',
            'float32', 'float16 weight scale'),
    Mistake('llm_int8_linear', 'return y_float + x_hat @ w_hat.T',
            'return x_hat @ w_hat.T',
            'add the float part', 'float part dropped'),
    Mistake('kv_cache_bytes_per_token', 'grids * (2 + bits / 8)',
            'grids * 2',
            'zero point', 'zero points forgotten'),
    Mistake('kv_cache_bytes_per_token', 'grids * (2 + bits / 8)',
            'grids * (2 + 1)',
            'bits / 8 bytes', 'zero point a whole byte'),
    Mistake('kv_cache_bytes_per_token', 'grids * (2 + bits / 8)',
            'grids * (4 + bits / 8)',
            'float16 scale', 'float32 scales'),
    Mistake('kv_cache_bytes_per_token', 'codes = d_model * bits / 8',
            'codes = d_model * bits',
            'bits / 8', 'bits counted as bytes'),
    Mistake('kv_cache_bytes_per_token', 'grids = n_heads if axis == "token" else d_model / group',
            'grids = 1 if axis == "token" else d_model / group',
            'one grid per head', 'one grid per token'),
    Mistake('kv_cache_bytes_per_token', 'grids = n_heads if axis == "token" else d_model / group',
            'grids = n_heads if axis == "token" else d_model',
            'shared by the `group` tokens', 'channel grids not shared'),
    Mistake('kv_cache_bytes_per_token', 'for axis in (key_axis, value_axis):',
            'for axis in (key_axis, key_axis):',
            'value_axis', 'values on the keys\' grids'),
    Mistake('kv_cache_bytes_per_token', 'return n_layers * total',
            'return total',
            'every layer', 'one layer'),
    Mistake('kv_cache_bytes_per_token', 'return 2 * n_layers * d_model * 2.0',
            'return n_layers * d_model * 2.0',
            'keys and values', 'float16: keys only'),
]
