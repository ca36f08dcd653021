#!/usr/bin/env python3
"""Render the bundled example's int8 report (`onnxopt optimize ... --report`) in headless Chromium
and save a PNG of the whole page (docs/report.png, shown in the README).

Needs the report extra (matplotlib, whose Pillow crops the page) and Debian's `chromium`
(`apt-get install -y chromium`). Usage: python tools/report_screenshot.py [--html R.html] [--png OUT.png]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 1200


def make_report(html: str) -> None:
    cmd = [sys.executable, "-m", "onnxopt.cli", "optimize", "examples/small_cnn.onnx", "-o",
           os.path.join(os.path.dirname(html), "small_cnn.int8.onnx"), "--passes", "int8",
           "--calibration", "examples/small_cnn_calib.npz", "--report", html]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def screenshot(html: str, png: str, height: int = 6000) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("error: chromium not found (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="onnxopt-chromium-") as profile:
        # --no-sandbox: containers run as root, where Chromium's sandbox refuses to start
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", "--force-device-scale-factor=1",
                        f"--window-size={WIDTH},{height}", f"--screenshot={png}", "file://" + os.path.abspath(html)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    crop_blank_bottom(png)


def crop_blank_bottom(png: str, margin: int = 24) -> None:
    """The window is taller than the page: cut the white below the last drawn row."""
    from PIL import Image, ImageChops

    im = Image.open(png).convert("RGB")
    box = ImageChops.difference(im, Image.new("RGB", im.size, (255, 255, 255))).getbbox()
    if box is not None:
        im = im.crop((0, 0, im.width, min(im.height, box[3] + margin)))
    # a palette keeps the README's image small; the octree one keeps colours that cover few pixels
    # (the median cut turned the orange legend swatch grey)
    im.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(png, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", help="an existing report to render (default: make the example's)")
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "report.png"))
    args = ap.parse_args()
    html = args.html
    if html is None:
        os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
        html = os.path.join(ROOT, "build", "small_cnn.int8.report.html")
        make_report(html)
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    screenshot(html, args.png)
    print(f"wrote {args.png} from {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
