"""Benchmark: deployment. quantlab's integers against ONNX Runtime and the NumPy engine, and speed.

Calibrates the 8-bit per-channel ``Net`` on the embedded training digits, exports it to ONNX
(quantlab.export.to_onnx) and prints on the official 10,000 MNIST test images (or the embedded
1,000 when the official set is absent):
1. how many logit integers ONNX Runtime and quantlab.engine give that differ from quantlab's
   ``integer_inference``, with quantlab's default (qnnpack) multiplier formula and with
   ``multiplier="onnxruntime"``;
2. seconds for all images, warm, min of 5 runs, in one process: float PyTorch, quantlab integer,
   PyTorch qnnpack int8 (while torch.ao exists), ONNX Runtime int8, the NumPy engine.
Target (issue 11): 0 differing integers with ONNX Runtime's formula; NumPy engine < 3x float.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings

import onnxruntime as ort
import torch
from common import test_sets

from quantlab.data import mnist_loaders
from quantlab.engine import Engine
from quantlab.export import to_onnx
from quantlab.models import quantize_model
from quantlab.reference import DEPRECATION_MESSAGES, torch_ao_available, torch_quantized_model
from quantlab.training import pretrained

CHUNK = 256


def best_of(fn, repeats=5):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    for message in DEPRECATION_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    torch.set_num_threads(2)
    train_loader, test_loader = mnist_loaders("embedded")
    sets = test_sets(test_loader)
    name, loader = ("official", sets["official"]) if "official" in sets else ("embedded", test_loader)
    images = torch.cat([x for x, _ in loader])
    x_np = images.numpy()
    net = pretrained("net").eval()
    qnet = quantize_model(net, 8, per_channel=True).calibrate(train_loader).freeze()
    q_ort = copy.deepcopy(qnet).freeze(multiplier="onnxruntime")
    q_x = qnet.q_in.quantize_tensor(images)
    path = tempfile.mkdtemp() + "/net_int8.onnx"
    to_onnx(qnet, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    engine = Engine(path)
    engine_ort = Engine(path, multiplier="onnxruntime")

    print(f"{len(images)} {name} test images; torch {torch.__version__}, onnxruntime "
          f"{ort.__version__}, 2 threads\n")
    print(f"{'logit integers that differ from quantlab':58s}{'qnnpack M':>12s}{'ORT M':>10s}")
    ref = {"qnnpack": qnet.integer_inference(q_x).numpy(),
           "onnxruntime": q_ort.integer_inference(q_x).numpy()}
    n = ref["qnnpack"].size
    y_ort = sess.run(["y_q"], {"x": x_np})[0]
    rows = [("ONNX Runtime (its own multiplier formula)", y_ort, y_ort),
            ("NumPy engine (the file's formula note / onnxruntime)", engine.run(x_np)["y_q"],
             engine_ort.run(x_np)["y_q"])]
    for label, a, b in rows:
        d1 = int((a != ref["qnnpack"]).sum())
        d2 = int((b != ref["onnxruntime"]).sum())
        print(f"{label:58s}{d1:>12d}{d2:>10d}   (of {n})")
    print(f"{'quantlab qnnpack M vs quantlab onnxruntime M':58s}"
          f"{int((ref['qnnpack'] != ref['onnxruntime']).sum()):>12d}")
    acc = {k: float((torch.from_numpy(v).argmax(1) == torch.cat([y for _, y in loader])).float()
                    .mean()) for k, v in (("quantlab", ref["qnnpack"]), ("ORT", y_ort))}
    print(f"accuracy: quantlab {100 * acc['quantlab']:.2f}%, ONNX Runtime {100 * acc['ORT']:.2f}%")

    print(f"\nspeed on {len(images)} images (warm, min of 5 runs)")
    with torch.no_grad():
        t_float = best_of(lambda: [net(c) for c in images.split(CHUNK)])
    rows = [("float PyTorch", t_float),
            ("quantlab integer_inference", best_of(lambda: qnet.quantize_inference(images)))]
    if torch_ao_available():
        tq = torch_quantized_model(qnet, "qnnpack")
        rows.append(("PyTorch qnnpack int8", best_of(lambda: [tq(c) for c in images.split(CHUNK)])))
    rows.append(("ONNX Runtime int8", best_of(lambda: sess.run(["y"], {"x": x_np}))))
    rows.append(("NumPy engine", best_of(lambda: engine(x_np))))
    print(f"{'model':32s}{'seconds':>10s}{'x float':>10s}")
    for label, t in rows:
        print(f"{label:32s}{t:10.3f}{t / t_float:10.2f}")


if __name__ == "__main__":
    main()
