"""The workflow onnxopt serves, end to end, in under a minute on a laptop CPU:

train a small CNN in PyTorch on scikit-learn's digits -> torch.onnx.export -> onnxopt int8 with
calibration -> run with onnxopt.InferenceSession -> accuracy and latency of fp32 vs int8.

    pip install torch==2.13.0 scikit-learn      (plus onnxopt)
    python examples/pytorch_to_int8.py [--epochs 15] [--out DIR]
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import onnxopt

nn = torch.nn


def train(epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=1)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * 16, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    xt, yt = torch.tensor(x_train), torch.tensor(y_train)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval(), (x_train, y_train, x_test, y_test)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default=None, help="where to write the fp32 and int8 models (default: a temp dir)")
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="onnxopt-example-")
    os.makedirs(out, exist_ok=True)

    t0 = time.perf_counter()
    net, (x_train, y_train, x_test, y_test) = train(args.epochs)
    fp32_path = os.path.join(out, "digits_fp32.onnx")
    torch.onnx.export(net, (torch.tensor(x_test[:1]),), fp32_path, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    print(f"trained and exported in {time.perf_counter() - t0:.1f} s -> {fp32_path}")

    # calibration: a few batches of training images (never the test set)
    calibration = [{"x": x_train[i:i + 32]} for i in range(0, 256, 32)]
    int8, report = onnxopt.optimize(fp32_path, passes=["int8"], calibration=calibration, return_report=True)
    int8_path = os.path.join(out, "digits_int8.onnx")
    onnxopt.save(int8, int8_path)
    print(report.format())

    import onnxruntime as ort

    from onnxopt.bench import time_sessions

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # the deployment target: one small core
    sessions = {name: onnxopt.InferenceSession(path, sess_options=so)
                for name, path in (("fp32", fp32_path), ("int8", int8_path))}
    # latency: both models interleaved round by round, medians (a shared machine is noisy)
    ms = dict(zip(sessions, time_sessions(list(sessions.values()), {"x": x_test[:64]}, rounds=9)))
    results = {}
    for name, sess in sessions.items():
        pred = sess.run(None, {"x": x_test})[0].argmax(1)
        path = fp32_path if name == "fp32" else int8_path
        results[name] = (float(np.mean(pred == y_test)), ms[name], os.path.getsize(path))
    print(f"\n{'model':<6} {'accuracy':>9} {'latency (batch 64, 1 thread)':>29} {'size':>10}")
    for name, (acc, ms, size) in results.items():
        print(f"{name:<6} {acc * 100:>8.2f}% {ms:>26.3f} ms {size / 1024:>7.1f} KiB")
    (a32, t32, s32), (a8, t8, s8) = results["fp32"], results["int8"]
    print(f"\nint8 vs fp32: accuracy {100 * (a8 - a32):+.2f} points, {t32 / t8:.2f}x speed, {s8 / s32:.2f}x size")
    return results


if __name__ == "__main__":
    main()
