"""Benchmark: the small ResNet (quantlab.models.ResNet), float vs its integer versions.

Calibrates on the embedded training digits and prints
1. accuracy on the embedded 1,000-digit split (95% Wilson interval) and the official 10,000-image
   test set (when ../shared/data/mnist exists): float, PTQ int8 and int4 (calibrated on 1,024
   training digits, as notebook h), QAT int4 (``--qat-epochs``, 0 to skip);
   agreement of the int8 logit integers with PyTorch's qnnpack kernels, with ONNX Runtime (the
   exported graph: QLinearConv, QLinearAdd, QLinearGlobalAveragePool) and with quantlab's NumPy
   engine;
2. seconds to run the official images (or the embedded split) through the float model and
   quantlab's integer model. Target (issue 13): integer inference <= 2x the float model's time.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import time

import torch
from common import CHUNK, best_of, setup

from quantlab import quantize_model
from quantlab.reference import torch_ao_available, torch_quantized_model
from quantlab.training import evaluate, pretrained, train, wilson_interval


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timing runs (the best counts)")
    args = parser.parse_args()
    train_loader, test_loader, sets = setup()
    resnet = pretrained("resnet")
    models = {"float ResNet": resnet}
    for bits in (8, 4):
        models[f"PTQ int{bits} per-channel"] = quantize_model(resnet, bits).calibrate(
            train_loader, num_batches=16).freeze()
    if args.qat_epochs:
        qat = quantize_model(resnet, 4, qat=True)
        start = time.perf_counter()
        train(qat, train_loader, epochs=args.qat_epochs, progress=False)
        models["QAT int4 per-channel"] = qat.freeze()
        print(f"QAT int4: {args.qat_epochs} epoch(s) in {time.perf_counter() - start:.0f} s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"{'model':26s}{'embedded % [95% interval]':>28s}" + "".join(
        f"{name + ' %':>14s}" for name in sets if name != "embedded"))
    for label, model in models.items():
        fn = model if label.startswith("float") else model.quantize_inference
        accs = {s: evaluate(fn, loader) for s, loader in sets.items()}
        n = len(test_loader.dataset)
        lo, hi = wilson_interval(round(accs["embedded"] * n), n)
        emb = f"{100 * accs['embedded']:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]"
        print(f"{label:26s}{emb:>28s}" + "".join(f"{100 * accs[s]:14.2f}" for s in sets
                                                  if s != "embedded"), flush=True)

    images = torch.cat([x for x, _ in sets.get("official", test_loader)])
    qnet = models["PTQ int8 per-channel"]
    if torch_ao_available():
        q_x = qnet.q_in.quantize_tensor(images)
        ours, theirs = qnet.integer_inference(q_x), torch_quantized_model(qnet).integer_inference(q_x)
        print(f"\nint8 logit integers equal to PyTorch's qnnpack: {int((ours == theirs).sum())} of "
              f"{ours.numel()}; predictions equal: {int((ours.argmax(1) == theirs.argmax(1)).sum())}"
              f" of {len(images)}")
    agreement_with_onnx(resnet, train_loader, images)
    print(f"\nspeed on {len(images)} images in batches of {CHUNK} (best of {args.repeats})")
    print(f"{'model':38s}{'seconds':>10s}{'x float':>10s}")
    t_float = best_of(resnet, images, args.repeats)
    print(f"{'float ResNet':38s}{t_float:10.3f}{1.0:10.2f}")
    t_int = best_of(qnet.quantize_inference, images, args.repeats)
    print(f"{'quantlab int8 integer inference':38s}{t_int:10.3f}{t_int / t_float:10.2f}")
    print(f"target: integer <= 2x float: {'met' if t_int <= 2 * t_float else 'NOT met'}")


def agreement_with_onnx(resnet, train_loader, images):
    """int8 logit integers of ONNX Runtime and of the NumPy engine against quantlab's (the model
    frozen with ONNX Runtime's conv multiplier formula, so that only the adds can differ)."""
    import onnxruntime as ort

    from quantlab.engine import Engine
    from quantlab.export import to_onnx

    qnet = quantize_model(resnet, 8, multiplier="onnxruntime").calibrate(
        train_loader, num_batches=16).freeze()
    model = to_onnx(qnet, input_dtype="uint8")
    q_x = qnet.q_in.quantize_tensor(images)
    ours = qnet.integer_inference(q_x).numpy()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = session.run(["y_q"], {"x_q": q_x.to(torch.uint8).numpy()})[0].astype("int32")
    engine = Engine(model).run(q_x.to(torch.uint8).numpy())["y_q"].astype("int32")
    # ONNX Runtime's count depends on the CPU and its version (its x86 QLinearAdd rounds in float32)
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    print(f"\nONNX Runtime {ort.__version__} on {platform.machine()} "
          f"({', '.join(isa) or 'no x86 flags read'})")
    for name, other in (("ONNX Runtime", theirs), ("the NumPy engine", engine)):
        diff = abs(ours - other)
        print(f"int8 logit integers equal to {name}: {int((diff == 0).sum())} of {diff.size} "
              f"(max difference {int(diff.max())} LSB); predictions equal: "
              f"{int((ours.argmax(1) == other.argmax(1)).sum())} of {len(ours)}")


if __name__ == "__main__":
    main()
