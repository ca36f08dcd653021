"""Models exported from PyTorch with both exporters (TorchScript and dynamo, the latter saved with
external data) optimize to valid, equivalent models. Skipped when torch is not installed (the test
command installs it)."""

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt import verify

torch = pytest.importorskip("torch")
nn = torch.nn


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU6())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(32, 10))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = self.dw(self.down(x))
        return self.head(x.mean(dim=(2, 3)))


class TinyEncoder(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.d = d

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, dim=-1)
        x = x + self.proj(att @ v)
        return x + self.ff(self.ln2(x))


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _export(model, example, path, dynamo):
    kwargs = dict(input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    if dynamo:
        kwargs = dict(input_names=["x"], output_names=["y"], dynamo=True, external_data=True,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    else:
        kwargs["dynamo"] = False
    torch.onnx.export(model, (example,), str(path), **kwargs)
    return path


CASES = [("cnn", SmallCNN, (2, 3, 16, 16)), ("encoder", TinyEncoder, (2, 8, 32))]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name,cls,shape", CASES, ids=[c[0] for c in CASES])
def test_exported_model_optimizes(tmp_path, name, cls, shape, dynamo):
    torch.manual_seed(0)
    model = _randomize_bn(cls())
    x = torch.randn(*shape)
    path = _export(model, x, tmp_path / f"{name}.onnx", dynamo)
    with torch.no_grad():
        expected = model(x).numpy()
    original = onnx.load(str(path))
    optimized, report = onnxopt.optimize(str(path), verify=True, return_report=True)
    onnx.checker.check_model(optimized, full_check=True)  # dynamo's external weights are in the proto now
    assert [o.name for o in optimized.graph.output] == [o.name for o in original.graph.output]
    # the dynamo exporter already folds BatchNorm and drops Identity; TorchScript leaves work to do
    assert report.nodes_after < report.nodes_before if not dynamo else report.nodes_after <= report.nodes_before
    feeds = {original.graph.input[0].name: x.numpy()}
    got = verify.run(optimized, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # a different batch size still works (dynamic dimension kept)
    x2 = torch.randn(5, *shape[1:])
    with torch.no_grad():
        np.testing.assert_allclose(verify.run(optimized, {original.graph.input[0].name: x2.numpy()})[0],
                                   model(x2).numpy(), rtol=1e-4, atol=1e-4)
    ops = {n.op_type for n in optimized.graph.node}
    assert "Identity" not in ops and "BatchNormalization" not in ops and "Dropout" not in ops
    if dynamo:  # the exporter wrote external data: the result still saves with plain onnx.save (issue 12)
        out = tmp_path / "out" / "o.onnx"
        out.parent.mkdir()
        onnx.save(optimized, str(out))
        onnx.checker.check_model(str(out), full_check=True)
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(None, feeds)[0], expected, rtol=1e-4, atol=1e-4)
