"""Exercises of lesson l (l_number_formats): statements, stubs, worked solutions, and the mistakes the
checker must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="l_number_formats",
    title="l · Exercises: FP8, MXFP4, NF4 and a k-means step (练习: 数值格式)",
    goal="Write the roundings that lesson l builds its number formats from: a float32 value rounded to FP8 E4M3 "
         "(ties to even, subnormals, saturation), MXFP4's shared power-of-two exponent and E2M1 elements, NF4's "
         "absmax and level indices, and one step of Lloyd's k-means for a codebook. The checker compares them with "
         "`ml_dtypes`' E4M3 cast, `quantlab.block_formats` (whose MXFP4 blocks lesson l checks byte for byte "
         "against gguf's quantizer, and whose NF4 levels are bitsandbytes' constants) and SciPy's `kmeans2`.",
    setup='''\
# setup: torch, NF4's 16 levels (lesson l, section 3.3) and the checker
import torch

from quantlab import check
from quantlab.block_formats import NF4_LEVELS''',
    exercises=[
        ex(1, "round_to_e4m3", "round to FP8 E4M3",
           r"""
           Lesson l, sections 1.3 and 1.4. Round every element of `x` (a float32 tensor of any shape, finite values) to
           the nearest value of **E4M3** (bias 7, 3 mantissa bits, no infinity, largest value 448) and return those
           values, float32, in `x`'s shape. For a magnitude $a = |x|$ with $k = \lfloor \log_2 a \rfloor$:
           $$ \text{step} = 2^{\max(k,\,-6) - 3}, \qquad \hat a = \min\big(\mathrm{round}(a / \text{step}) \cdot \text{step},\ 448\big), \qquad \hat x = \mathrm{sign}(x)\,\hat a $$
           - 3 mantissa bits: 8 values per power of two, so the step is $2^{k-3}$;
           - below the smallest normal value $2^{1-7} = 2^{-6}$ the **subnormals** keep the step $2^{-9}$ down to 0;
           - `round` is to the nearest, **ties to even** (`torch.round`): an even multiple of the step is an even code;
           - **saturate**: a magnitude that rounds above 448 becomes 448 (PyTorch's cast does so; `ml_dtypes` would
             give NaN, E4M3 has no $\infty$).

           $k$ exactly: `torch.frexp(a)` returns $f, e$ with $a = f \cdot 2^e$, $f \in [0.5, 1)$, so $k = e - 1$ (and $a = 0$
           gives $e = 0$, harmless here). The sign of a zero result is not checked.""",
           '''
           def round_to_e4m3(x):
               """x rounded to the nearest E4M3 value (ties to even, saturating at +-448), float32."""''',
           '''
           a = x.abs()
           _, e = torch.frexp(a)                        # a = f * 2**e, f in [0.5, 1): floor(log2 a) = e - 1
           exponent = torch.clamp(e - 1, min=-6)        # the subnormals keep the step of 2**-6's binade
           step = 2.0 ** (exponent - 3)                 # 3 mantissa bits: 8 values per power of two
           y = torch.round(a / step) * step             # nearest, ties to even (exact: step is a power of two)
           y = torch.clamp(y, max=448.0)                # saturate: E4M3's largest value
           return torch.copysign(y, x)'''),
        ex(2, "mxfp4_quantize", "a shared power-of-two exponent and E2M1 elements",
           r"""
           Lesson l, section 3.1. Cut each row of `x` (rows, n), float32, into blocks of `block` consecutive values (32 in
           the OCP spec; `block` divides n): block $j$ of row $r$ is `x[r, j*block:(j+1)*block]`. Each block stores one
           power-of-two scale $2^X$ (its E8M0 code is $X + 127$) and `block` **E2M1** elements:
           $$ X = \lfloor \log_2 \max_i |v_i| \rfloor - e_{max}, \qquad e_{max} = 2 \quad (\text{E2M1's largest value is } 6 = 1.5 \cdot 2^2) $$
           clamped to E8M0's range $[-127, 127]$; an all-zero block has $X = -127$. The floor must be exact:
           `torch.frexp` (as in l1); a float32 `torch.log2` can round a maximum just below a power of two up to it.

           Each element is $v_i / 2^X$ (exact: a power of two) rounded to the nearest E2M1 value, $\pm\{0, 0.5, 1, 1.5,
           2, 3, 4, 6\}$: l1's rounding with E2M1's fields (1 mantissa bit, bias 1: step $2^{\max(k,\,0) - 1}$), **ties to
           even** (0.25 → 0, 0.75 → 1, 2.5 → 2, 5 → 4) and **saturating** at 6 ($|v_i| / 2^X$ reaches up to just below
           8). Return `(X, elements)`: `X` int32 (rows, n // block), `elements` float32 (rows, n), the elements
           themselves (not multiplied back by $2^X$).""",
           '''
           def mxfp4_quantize(x, block=32):
               """(X, elements): int32 shared exponents (rows, n // block), float32 E2M1 elements (rows, n)."""''',
           '''
           rows, n = x.shape
           blocks = x.reshape(rows, n // block, block)                 # consecutive values of a row
           amax = blocks.abs().amax(dim=2)
           _, e = torch.frexp(amax)                                    # floor(log2 amax) = e - 1, exactly
           X = torch.where(amax > 0, e - 1 - 2, -127)                  # emax = 2; an all-zero block: -127
           X = torch.clamp(X, -127, 127)                               # E8M0's range
           v = blocks * 2.0 ** (-X[:, :, None])                        # exact: a power of two
           a = v.abs()
           _, e_v = torch.frexp(a)
           step = 2.0 ** (torch.clamp(e_v - 1, min=0) - 1)             # 1 mantissa bit; below 1 the step stays 0.5
           q = torch.clamp(torch.round(a / step) * step, max=6.0)      # nearest, ties to even; saturate at 6
           return X.to(torch.int32), torch.copysign(q, v).reshape(rows, n)'''),
        ex(3, "nf4_encode", "an absmax and the nearest of 16 levels",
           r"""
           Lesson l, section 3.3. Cut each row of `x` (rows, n), float32, into blocks of `block` consecutive values (64 in
           QLoRA; `block` divides n). Each block stores its **absmax** $m = \max_i |v_i|$ (float32) and, per value, a 4-bit
           code: the index of the nearest of the 16 levels $L_0 < \dots < L_{15}$ (`NF4_LEVELS`, from -1 to 1, imported in
           the setup cell), by bitsandbytes' rule:
           $$ y_i = v_i \cdot \tfrac{1}{m}, \qquad \mu_j = \frac{L_j + L_{j+1}}{2} \ \ (j = 0, \dots, 14), \qquad c_i = \#\{\, j : \mu_j < y_i \,\} $$
           with the float32 reciprocal $\tfrac{1}{m}$ and the midpoints $\mu_j$ computed in float32: the code is the number
           of midpoints strictly below $y_i$, so a value exactly on a midpoint goes to the lower level. An all-zero block
           has $m = 0$ and every code 7 (the level 0). Return `(absmax, codes)`: `absmax` float32 (rows, n // block),
           `codes` int32 (rows, n).""",
           '''
           def nf4_encode(x, block=64):
               """(absmax, codes): float32 absmax per block (rows, n // block), int32 level indices (rows, n)."""''',
           '''
           rows, n = x.shape
           blocks = x.reshape(rows, -1, block)                         # consecutive values of a row
           absmax = blocks.abs().amax(dim=2)                           # float32, one per block
           inv = torch.where(absmax > 0, 1.0 / absmax, 0.0)            # an all-zero block: y = 0, code 7
           y = blocks * inv[:, :, None]                                # in [-1, 1]
           mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2               # the 15 midpoints, float32
           codes = (y[..., None] > mids).sum(dim=-1)                   # midpoints strictly below y
           return absmax, codes.reshape(rows, n).to(torch.int32)'''),
        ex(4, "kmeans_step", "one step of Lloyd's k-means",
           r"""
           Lesson l, section 4. One step of Lloyd's algorithm on the values `w` (n,) float32 with the centroids
           `centroids` (k,) float32 (in any order; two may be equal):
           1. assign each value to its nearest centroid, $\text{index}_i = \arg\min_j |w_i - c_j|$, a tie going to the first
              (lowest $j$, as `torch.argmin` does);
           2. move each centroid to the mean of the values assigned to it; a centroid no value is assigned to (an empty
              cluster) keeps its place.

           Compute in float64. Return `(index, new_centroids)`: `index` int64 (n,), the assignment to the centroids given
           (before they move), and `new_centroids` float32 (k,). The checker compares them with SciPy's
           `kmeans2(w, centroids, iter=1, minit="matrix")`, which takes exactly this step.""",
           '''
           def kmeans_step(w, centroids):
               """(index, new_centroids): int64 nearest-centroid index (n,), float32 cluster means (k,)."""''',
           '''
           w, c = w.double(), centroids.double()
           index = (w[:, None] - c[None, :]).abs().argmin(dim=1)         # nearest; a tie goes to the first
           sums = torch.zeros_like(c).index_add_(0, index, w)
           counts = torch.bincount(index, minlength=len(c)).double()
           new = torch.where(counts > 0, sums / counts.clamp(min=1), c)  # an empty cluster keeps its centroid
           return index, new.float()'''),
    ])

#: (exercise, text in its solution, the mistake, words its hint must contain)
MISTAKES: list[Mistake] = [
    Mistake('round_to_e4m3', 'y = torch.round(a / step) * step',
            'y = torch.floor(a / step) * step',
            'do not truncate', 'truncation'),
    Mistake('round_to_e4m3', 'y = torch.round(a / step) * step',
            'y = torch.floor(a / step + 0.5) * step',
            'ties to even', 'ties away from zero'),
    Mistake('round_to_e4m3', 'y = torch.clamp(y, max=448.0)',
            'y = y',
            'saturate', 'no saturation'),
    Mistake('round_to_e4m3', 'y = torch.clamp(y, max=448.0)',
            'y = torch.clamp(y, max=240.0)',
            'not 240', "E5M2-style top (IEEE's 240)"),
    Mistake('round_to_e4m3', 'exponent = torch.clamp(e - 1, min=-6)',
            'exponent = e - 1',
            'subnormals keep the step 2**-9', 'no subnormals (finer steps below 2**-6)'),
    Mistake('round_to_e4m3', 'y = torch.round(a / step) * step',
            'y = torch.where(a < 2.0 ** -6, 0.0, torch.round(a / step) * step)',
            'not flushed to zero', 'subnormals flushed to zero'),
    Mistake('round_to_e4m3', 'exponent = torch.clamp(e - 1, min=-6)',
            'exponent = torch.clamp(e - 1, min=-7)',
            'bias 7', 'bias 8 (smallest normal 2**-7)'),
    Mistake('round_to_e4m3', 'step = 2.0 ** (exponent - 3)',
            'step = 2.0 ** (exponent - 2)',
            '3 mantissa bits', "E5M2's 2 mantissa bits"),
    Mistake('round_to_e4m3', 'return torch.copysign(y, x)',
            'return y',
            'put the sign back', 'sign lost'),
    Mistake('mxfp4_quantize', 'X = torch.where(amax > 0, e - 1 - 2, -127)',
            'X = torch.where(amax > 0, torch.ceil(torch.log2(amax)).int() - 2, -127)',
            'floor, not ceil', 'ceil(log2 amax)'),
    Mistake('mxfp4_quantize', 'X = torch.where(amax > 0, e - 1 - 2, -127)',
            'X = torch.where(amax > 0, torch.floor(torch.log2(amax)).int() - 2, -127)',
            'float32 log2', 'float32 log2'),
    Mistake('mxfp4_quantize', 'X = torch.where(amax > 0, e - 1 - 2, -127)',
            'X = torch.where(amax > 0, e - 1 - 8, -127)',
            'emax = 2', "E4M3's emax 8"),
    Mistake('mxfp4_quantize', 'X = torch.where(amax > 0, e - 1 - 2, -127)',
            'X = torch.where(amax > 0, torch.floor(torch.log2(amax / 6)).int(), -127)',
            'emax = 2', 'floor(log2(amax / 6))'),
    Mistake('mxfp4_quantize', 'X = torch.where(amax > 0, e - 1 - 2, -127)',
            'X = e - 1 - 2',
            'all-zero block', 'all-zero block from frexp(0)'),
    Mistake('mxfp4_quantize', 'X = torch.clamp(X, -127, 127)',
            'X = X',
            "E8M0's range", 'X not clamped'),
    Mistake('mxfp4_quantize', 'amax = blocks.abs().amax(dim=2)',
            'amax = blocks.abs().mean(dim=2)',
            'largest magnitude', 'mean |v| instead of amax'),
    Mistake('mxfp4_quantize', 'amax = blocks.abs().amax(dim=2)',
            'amax = blocks.amax(dim=2)',
            'abs first', 'max instead of max|v|'),
    Mistake('mxfp4_quantize', 'blocks = x.reshape(rows, n // block, block)',
            'blocks = x.reshape(rows, block, n // block).transpose(1, 2)',
            'consecutive values', 'strided blocks'),
    Mistake('mxfp4_quantize', 'q = torch.clamp(torch.round(a / step) * step, max=6.0)',
            'q = torch.round(a / step) * step',
            'saturate at 6', 'no saturation'),
    Mistake('mxfp4_quantize', 'q = torch.clamp(torch.round(a / step) * step, max=6.0)',
            'q = torch.clamp(torch.floor(a / step + 0.5) * step, max=6.0)',
            'ties to even', 'ties away from zero'),
    Mistake('mxfp4_quantize', 'return X.to(torch.int32), torch.copysign(q, v).reshape(rows, n)',
            'return X.to(torch.int32), q.reshape(rows, n)',
            'put the sign back', 'sign lost'),
    Mistake('mxfp4_quantize', 'return X.to(torch.int32), torch.copysign(q, v).reshape(rows, n)',
            'return X.to(torch.int32), (torch.copysign(q, v) * 2.0 ** X[:, :, None]).reshape(rows, n)',
            'not multiplied back', 'values read back, not elements'),
    Mistake('nf4_encode', 'absmax = blocks.abs().amax(dim=2)',
            'absmax = blocks.abs().mean(dim=2)',
            'absmax', 'mean |v| instead of absmax'),
    Mistake('nf4_encode', 'absmax = blocks.abs().amax(dim=2)',
            'absmax = blocks.amax(dim=2)',
            'abs first', 'max instead of max|v|'),
    Mistake('nf4_encode', 'absmax = blocks.abs().amax(dim=2)',
            'absmax = blocks.abs().amax(dim=(1, 2))[:, None].expand(rows, n // block)',
            'one absmax per block', 'one absmax per row'),
    Mistake('nf4_encode', 'blocks = x.reshape(rows, -1, block)',
            'blocks = x.reshape(rows, block, -1).transpose(1, 2)',
            'consecutive values', 'strided blocks'),
    Mistake('nf4_encode', 'y = blocks * inv[:, :, None]',
            'y = torch.nan_to_num(blocks / absmax[:, :, None])',
            'float32 reciprocal', 'divides by absmax'),
    Mistake('nf4_encode', 'inv = torch.where(absmax > 0, 1.0 / absmax, 0.0)',
            'inv = 1.0 / absmax',
            'all-zero block', 'all-zero block gives NaN'),
    Mistake('nf4_encode', 'codes = (y[..., None] > mids).sum(dim=-1)',
            'codes = (y[..., None] >= mids).sum(dim=-1)',
            'goes to the lower level', 'ties to the upper level'),
    Mistake('nf4_encode', 'codes = (y[..., None] > mids).sum(dim=-1)',
            'codes = (y[..., None] - NF4_LEVELS).abs().argmin(dim=-1)',
            'compare with the float32 midpoints', 'nearest level by |y - L|'),
    Mistake('nf4_encode', 'mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2',
            'mids = (NF4_LEVELS[1:].double() + NF4_LEVELS[:-1].double()) / 2',
            'compare with the float32 midpoints', 'float64 midpoints'),
    Mistake('nf4_encode', 'return absmax, codes.reshape(rows, n).to(torch.int32)',
            'return absmax, NF4_LEVELS[codes].reshape(rows, n)',
            'indices 0..15', 'levels returned, not codes'),
    Mistake('kmeans_step', 'new = torch.where(counts > 0, sums / counts.clamp(min=1), c)',
            'new = sums / counts.clamp(min=1)',
            'empty cluster keeps its centroid', 'empty cluster moved to 0'),
    Mistake('kmeans_step', 'new = torch.where(counts > 0, sums / counts.clamp(min=1), c)',
            'new = sums / counts',
            'empty cluster keeps its centroid', 'empty cluster NaN'),
    Mistake('kmeans_step', 'sums / counts.clamp(min=1)',
            'sums',
            'the mean of', 'sum, not mean'),
    Mistake('kmeans_step', 'index = (w[:, None] - c[None, :]).abs().argmin(dim=1)',
            'index = (w[:, None] - c[None, :]).abs().argmax(dim=1)',
            'nearest centroid', 'farthest centroid'),
    Mistake('kmeans_step', 'index = (w[:, None] - c[None, :]).abs().argmin(dim=1)',
            'index = (w[:, None] - c[None, :]).argmin(dim=1)',
            'distance |w - c|', 'signed difference'),
    Mistake('kmeans_step', 'return index, new.float()',
            'return (w[:, None] - new[None, :]).abs().argmin(dim=1), new.float()',
            'centroids given', 'index to the moved centroids'),
]
