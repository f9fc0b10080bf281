"""Exercises of lesson j (j_gptq_awq): statements, stubs, worked solutions, and the mistakes the
checker must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="j_gptq_awq",
    title="j · Exercises: GPTQ's Hessian and column step, AWQ's scales (练习: GPTQ 与 AWQ)",
    goal="Write the pieces of GPTQ and AWQ that lesson j derives: the dampened Hessian from calibration inputs, "
         "one column step of GPTQ (quantize a column, feed its error forward through the Cholesky factor), AWQ's "
         "per-channel scales from activation magnitudes, and their folding into the LayerNorm before a Linear. "
         "The checker compares them with `quantlab.gptq` and `quantlab.awq` on small tensors.",
    oracle='`quantlab.gptq` and `quantlab.awq`',
    setup='''\
# setup: torch and the checker
import torch

from quantlab import check''',
    exercises=[
        ex(1, "dampened_hessian", "the dampened Hessian",
           r"""
           For the calibration inputs `x` (N, in) of one Linear (float32, one row per input vector), lesson j, sections 1.1
           and 1.2:
           $$ H = \frac{2}{N}\,X^\top X, \qquad H \leftarrow H + \lambda I, \quad \lambda = \text{percdamp}\cdot\mathrm{mean}(\mathrm{diag}\,H) $$
           Compute in float64 and return $H$ (in, in) as a float64 tensor. The factor 2 and the $1/N$ make $H$ the Hessian of
           the mean squared output error. They change nothing in GPTQ's integers: any positive multiple of $H$ gives the same
           ratios $U_{ij}/U_{ii}$ (the damping is proportional to $H$ too), in exact arithmetic. We keep them, as lesson j and GPTQ's
           reference code define $H$. The damping is what makes $H$ invertible when $N <$ in or a channel is always 0.""",
           '''
           def dampened_hessian(x, percdamp=0.01):
               """H = 2 X^T X / N + percdamp * mean(diag) * I: float64 (in, in)."""''',
           '''
           x = x.double()                                   # float64: the Cholesky factorization needs the digits
           H = 2 * x.T @ x / x.shape[0]                     # (in, in)
           damp = percdamp * torch.diagonal(H).mean()
           return H + damp * torch.eye(H.shape[0], dtype=H.dtype)'''),
        ex(2, "gptq_step", "one GPTQ column step",
           r"""
           Lesson j, section 1.3. `W` (out, in) float64 holds the weights as corrected so far, `H_inv` (in, in) float64 the
           inverse of the dampened Hessian, `scale` (out,) float32 and `zero_point` (out,) int32 each row's asymmetric
           `bits`-bit grid (lesson i, one group per row). For column $i$:
           1. $U$ = the **upper** Cholesky factor of $H^{-1}$: $H^{-1} = U^\top U$ (`torch.linalg.cholesky(H_inv, upper=True)`;
              GPTQ computes it once for all columns, this step computes it itself).
           2. The codes of column $i$ on the row's grid, in float32 as in lesson i:
              $c = \mathrm{clamp}\big(\mathrm{round}(w_i \cdot \tfrac{1}{S}) + Z,\ 0,\ 2^{b}-1\big)$ with $w_i$ = `W[:, i]` converted to float32,
              the float32 reciprocal, rounded half to even, as int32. The clamp matters: corrected weights can leave the
              row's original range.
           3. $\hat w_i = S_{16}\,(c - Z)$ in float64, with $S_{16}$ the scale as stored, in float16 (`scale.half().double()`).
           4. $e_i = (w_i - \hat w_i) / U_{ii}$ (float64 $w_i$), and $w_j \leftarrow w_j - e_i\, U_{ij}$ for every $j > i$; the columns
              $0..i$ keep their values (column $i$ too: its integers are returned separately).

           Return `(codes, W_new)`: the int32 codes (out,) and a new float64 tensor (out, in).""",
           '''
           def gptq_step(W, H_inv, i, scale, zero_point, bits):
               """(codes of column i, W with the columns after i corrected)."""''',
           '''
           U = torch.linalg.cholesky(H_inv, upper=True)                     # H^-1 = U^T U, U upper triangular
           codes = torch.round(W[:, i].float() * (1.0 / scale)) + zero_point  # lesson i's grid, in float32
           codes = torch.clamp(codes, 0, 2 ** bits - 1).to(torch.int32)
           w_hat = scale.half().double() * (codes - zero_point).double()      # with the stored float16 scale
           e = (W[:, i] - w_hat) / U[i, i]
           W = W.clone()
           W[:, i + 1:] -= e[:, None] * U[i, i + 1:][None, :]                # only the columns after i
           return codes, W'''),
        ex(3, "awq_scale", "AWQ's per-channel scales",
           r"""
           Lesson j, section 2.1: from the calibration inputs `x` (N, in) of one Linear, per input channel $c$
           $$ \overline{|x|}_c = \frac{1}{N}\sum_n |x_{nc}|, \qquad s_c = \max\big(\overline{|x|}_c,\ 10^{-4}\big)^{\alpha}, \qquad
              s \leftarrow \frac{s}{\sqrt{\max_c s_c \cdot \min_c s_c}} $$
           (`quantlab.awq.awq_scale`: the clamp at $10^{-4}$ keeps a channel that is always 0 from making $s_c = 0$; AWQ's
           reference code clamps after the power instead: the same scales unless a channel's $\overline{|x|}_c$ is below $10^{-4}$; the
           normalization centres the scales around 1). Compute in float64 and return $s$ (in,) as float32; it is compared
           within a relative $2\cdot10^{-6}$.""",
           '''
           def awq_scale(x, alpha):
               """s (in,) float32: clamp(mean |x|, 1e-4) ** alpha per input channel, normalized."""''',
           '''
           mean_abs = x.double().abs().mean(dim=0)                 # mean |x| per input channel
           s = mean_abs.clamp(min=1e-4) ** alpha
           s = s / torch.sqrt(s.max() * s.min())                   # centred around 1
           return s.to(torch.float32)'''),
        ex(4, "awq_fold", "fold the scales into the LayerNorm",
           r"""
           Lesson j, section 2.2. A Linear with weight `w` (out, d) reads the output $y = \gamma \odot \hat x + \beta$ of a
           LayerNorm (weight $\gamma$ = `ln_weight`, bias $\beta$ = `ln_bias`, each (d,)). Since
           $W y = \big(W\,\mathrm{diag}(s)\big)\big(\mathrm{diag}(s)^{-1} y\big)$, folding AWQ's scales $s$ (d,) gives
           $$ W' = W\,\mathrm{diag}(s)\ \ (\text{column } c \text{ times } s_c), \qquad \gamma' = \gamma / s, \qquad \beta' = \beta / s $$
           and the float layer computes the same function (up to float rounding). Return `(w', ln_weight', ln_bias')`,
           float32.""",
           '''
           def awq_fold(w, ln_weight, ln_bias, s):
               """(w * s on the columns, ln_weight / s, ln_bias / s)."""''',
           '''
           return w * s, ln_weight / s, ln_bias / s    # s broadcasts along w's last dimension: its columns'''),
    ])

#: (exercise, text in its solution, the mistake, words its hint must contain)
MISTAKES: list[Mistake] = [
    Mistake('dampened_hessian', 'H = 2 * x.T @ x / x.shape[0]',
            'H = x.T @ x / x.shape[0]',
            'the factor 2', 'no factor 2'),
    Mistake('dampened_hessian', 'H = 2 * x.T @ x / x.shape[0]',
            'H = 2 * x.T @ x',
            'divide by N', 'a sum, not a mean'),
    Mistake('dampened_hessian', 'H = 2 * x.T @ x / x.shape[0]',
            'H = 2 * x @ x.T / x.shape[0]',
            'x.T @ x', 'X X^T (N x N)'),
    Mistake('dampened_hessian', 'torch.diagonal(H).mean()',
            'torch.diagonal(H).sum()',
            'not its sum', 'damped by the sum of the diagonal'),
    Mistake('dampened_hessian', 'torch.diagonal(H).mean()',
            'torch.diagonal(H).max()',
            'not its largest entry', 'damped by the max of the diagonal'),
    Mistake('dampened_hessian', 'H + damp * torch.eye(H.shape[0], dtype=H.dtype)',
            'H + damp',
            'diagonal only', 'damping added everywhere'),
    Mistake('dampened_hessian', 'x = x.double()',
            'x = x.float()',
            'compute in float64', 'float32'),
    Mistake('gptq_step', '/ U[i, i]',
            '',
            'divide the error by U[i, i]', 'error not divided by U_ii'),
    Mistake('gptq_step', 'torch.linalg.cholesky(H_inv, upper=True)',
            'torch.linalg.cholesky(H_inv)',
            'upper Cholesky factor', 'the lower factor'),
    Mistake('gptq_step', 'U[i, i + 1:][None, :]',
            'U[i + 1:, i][None, :]',
            'upper Cholesky factor', "U's column, not its row"),
    Mistake('gptq_step', 'torch.linalg.cholesky(H_inv, upper=True)',
            'torch.linalg.cholesky(torch.linalg.inv(H_inv), upper=True)',
            'not of the Hessian H', 'Cholesky factor of H'),
    Mistake('gptq_step', 'U = torch.linalg.cholesky(H_inv, upper=True)',
            'U = H_inv',
            'row i of U, not of H^-1', 'rows of the full inverse'),
    Mistake('gptq_step', 'W[:, i + 1:] -= e[:, None] * U[i, i + 1:][None, :]',
            'W[:, i:] -= e[:, None] * U[i, i:][None, :]',
            'column i keeps its float value', 'column i updated too'),
    Mistake('gptq_step', '-= e[:, None]',
            '+= e[:, None]',
            'subtract', 'update with the wrong sign'),
    Mistake('gptq_step', 'scale.half().double()',
            'scale.double()',
            'stored float16 scale', 'w_hat with the float32 scale'),
    Mistake('gptq_step', 'W[:, i].float() * (1.0 / scale)',
            'W[:, i] * (1.0 / scale)',
            'compute the codes in float32', 'codes from float64'),
    Mistake('gptq_step', 'codes = torch.clamp(codes, 0, 2 ** bits - 1).to(torch.int32)',
            'codes = codes.to(torch.int32)',
            'clamp the codes', 'no clamp'),
    Mistake('awq_scale', 'x.double().abs().mean(dim=0)',
            'x.double().abs().amax(dim=0)',
            'not the largest |x|', 'max |x| (SmoothQuant)'),
    Mistake('awq_scale', 'x.double().abs().mean(dim=0)',
            'x.double().mean(dim=0)',
            'take the absolute values first', 'mean of x'),
    Mistake('awq_scale', 'x.double().abs().mean(dim=0)',
            'x.double().abs().mean(dim=1)',
            'over the N rows (dim 0)', 'mean over the channels'),
    Mistake('awq_scale', 's = s / torch.sqrt(s.max() * s.min())',
            's = s',
            'normalize: s / sqrt', 'not normalized'),
    Mistake('awq_scale', 's = s / torch.sqrt(s.max() * s.min())',
            's = s / s.max()',
            'not by max(s)', 'normalized by the max'),
    Mistake('awq_scale', 'mean_abs.clamp(min=1e-4) ** alpha',
            'mean_abs ** alpha',
            'clamp mean|x| at 1e-4', 'no clamp'),
    Mistake('awq_scale', 'return s.to(torch.float32)',
            'return s',
            'return float32', 'float64'),
    Mistake('awq_fold', 'return w * s, ln_weight / s, ln_bias / s',
            'return w * s[:, None], ln_weight / s, ln_bias / s',
            'scale the columns', 'rows scaled'),
    Mistake('awq_fold', 'return w * s, ln_weight / s, ln_bias / s',
            'return w / s, ln_weight * s, ln_bias * s',
            'scales the weights of the large-activation channels UP', 'weights divided'),
    Mistake('awq_fold', 'return w * s, ln_weight / s, ln_bias / s',
            'return w * s, ln_weight / s, ln_bias',
            "divide the LayerNorm's bias by s too", 'bias not folded'),
    Mistake('awq_fold', 'return w * s, ln_weight / s, ln_bias / s',
            'return w * s, ln_weight, ln_bias',
            'fold 1 / s into the LayerNorm', 'nothing folded'),
]
