"""Benchmark: calibration methods and advanced PTQ, accuracy x method x bit width, with times.

Calibration (and AdaRound / bias correction) use 2,000 digits drawn (seed 0) from the embedded
training split, never a test set. Accuracy is the integer model's (``quantize_inference``) on the
official 10,000-image MNIST test set when present (else the embedded 1,000 test digits). Bits
apply to weights and activations; the logits keep 8 bits. Recipes:

  minmax            today's: min/max activations, min/max per-channel weights
  <observer>        that activation observer, min/max weights
  mse/mse           MSE activations and MSE per-channel weights
  cle               cross-layer equalization, then mse/mse
  bc                mse/mse + bias correction
  adaround          mse/mse + AdaRound (``--iterations`` per layer; at the ``--seed-bits`` widths
                    ``--seeds`` seeds, mean and each; seed 0 elsewhere)
  adaround+recal    mse/mse + AdaRound, then the activation ranges observed again
                    (``ptq.recalibrate``: AdaRound moved the layers' outputs)
  adaround+bc       mse/mse + AdaRound + bias correction
  layerwise         mse/mse, then layer by layer (``ptq.layer_by_layer``): AdaRound on the quantized
                    model's inputs, bias correction against the float model, every range observed
                    again before the next layer (seeds as ``adaround``)
  gptq              the same layer by layer, with GPTQ instead of AdaRound (on the weight QParam's
                    per-channel grid; deterministic: one run)

Targets (issue 14, official set): 4 bits >= 98.35% (Net) / 98.45% (NetBN); 3 bits >= 98.2%;
2 bits >= 97.3% (mean over 3 AdaRound seeds; issue 26: Net and NetBN); <= 60 s per recipe on 2
cores. Times are CPU seconds (time.process_time), so a busy machine does not inflate them.
Usage: python benchmarks/bench_calibration.py [--models net netbn] [--bits 8 6 5 4 3 2]
       [--recipes ...] [--iterations 1000] [--batch-size 64] [--seeds 3] [--seed-bits 2]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
from common import test_sets
from torch.utils.data import DataLoader, TensorDataset

from quantlab import ptq
from quantlab.data import embedded_split
from quantlab.models import quantize_model
from quantlab.observers import OBSERVERS
from quantlab.reference import DEPRECATION_MESSAGES
from quantlab.training import pretrained

RECIPES = (["minmax"] + [o for o in OBSERVERS if o != "minmax"]
           + ["mse/mse", "cle", "bc", "adaround", "adaround+recal", "adaround+bc", "layerwise",
              "gptq"])
SEEDED = ("adaround", "adaround+recal", "adaround+bc", "layerwise")


def calibration_images(n=2000, seed=0):
    x_tr, _, _, _ = embedded_split()
    idx = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(seed))[:n]
    return x_tr[idx]


def build(name, bits, recipe, calib, iterations, seed, batch_size=64):
    net = pretrained(name)
    if recipe == "cle":
        net = ptq.equalize(net)
    if recipe in OBSERVERS:
        act, wobs = recipe, "minmax"
    else:
        act, wobs = "mse", "mse"
    qnet = quantize_model(net, bits, observer=act, weight_observer=wobs)
    qnet.calibrate(calib.split(500))
    if recipe.startswith("adaround"):
        ptq.adaround(qnet, calib, iterations=iterations, seed=seed)
    if recipe in ("layerwise", "gptq"):
        rounding = "adaround" if recipe == "layerwise" else "gptq"
        options = {"batch_size": batch_size} if rounding == "adaround" else {}
        ptq.layer_by_layer(qnet, calib, rounding, iterations=iterations, seed=seed, **options)
    if recipe in ("bc", "adaround+bc"):
        ptq.bias_correction(qnet, calib)
    if recipe == "adaround+recal":
        ptq.recalibrate(qnet, calib.split(500))
    return qnet.freeze()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["net", "netbn"])
    p.add_argument("--bits", nargs="+", type=int, default=[8, 6, 5, 4, 3, 2])
    p.add_argument("--recipes", nargs="+", default=RECIPES, choices=RECIPES)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64,
                   help="AdaRound's batch of calibration digits per step (recipe layerwise)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed-bits", nargs="+", type=int, default=[2],
                   help="the widths at which AdaRound runs --seeds seeds (elsewhere seed 0)")
    args = p.parse_args()
    for message in DEPRECATION_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    x_tr, y_tr, x_te, y_te = embedded_split()
    sets = test_sets(DataLoader(TensorDataset(x_te, y_te), batch_size=1000))
    where = "official" if "official" in sets else "embedded"
    calib = calibration_images()
    print(f"torch {torch.__version__}; calibration on {len(calib)} embedded training digits; "
          f"accuracy (%) of the integer model on the {where} test set; AdaRound "
          f"{args.iterations} iterations/layer; CPU seconds of this process per recipe "
          f"(calibrate + methods + freeze, not the evaluation; other jobs do not count), "
          f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.1f}\n", flush=True)
    for name in args.models:
        print(f"{name}: recipe, then per width: accuracy % (seconds); AdaRound: mean of the seeds [each]")
        for recipe in args.recipes:
            print(f"  {recipe:14s}", end="", flush=True)
            for bits in args.bits:
                seeds = range(args.seeds) if (recipe in SEEDED and bits in args.seed_bits) else [0]
                accs, secs = [], []
                for seed in seeds:
                    t = time.process_time()
                    qnet = build(name, bits, recipe, calib, args.iterations, seed, args.batch_size)
                    secs.append(time.process_time() - t)
                    accs.append(100 * sum(
                        int((qnet.quantize_inference(x).argmax(1) == y).sum())
                        for x, y in sets[where]) / len(sets[where].dataset))
                each = "" if len(accs) == 1 else " [" + "/".join(f"{a:.2f}" for a in accs) + "]"
                print(f"  {bits}b {sum(accs) / len(accs):6.2f}{each} ({sum(secs) / len(secs):.0f} s)",
                      end="", flush=True)
            print(flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
