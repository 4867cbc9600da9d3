#!/usr/bin/env python3
"""Generate a small, honest, synthetic demo dataset (NOT real retinal images).

Each image is a dark-red disc on black (a crude fundus-photo silhouette). The class decides a
visible feature the model can learn: ``healthy`` has no lesions, ``spots`` has bright yellow
dots (exudate-like), ``vessels`` has dark curved lines. Layout: OUT/{train,val,test}/<class>/*.png,
the same ImageFolder layout RETFound expects. Deterministic for a given --seed.
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("healthy", "spots", "vessels")


def make_image(cls, rng, size):
    img = Image.new("RGB", (size, size), (0, 0, 0))
    d = ImageDraw.Draw(img)
    m = int(size * 0.06)
    base = tuple(int(v) for v in rng.integers([150, 40, 10], [210, 80, 40]))
    d.ellipse([m, m, size - m, size - m], fill=base)
    c = size // 2 + int(rng.integers(-size // 10, size // 10))
    r = size // 14
    d.ellipse([c - r, c - r, c + r, c + r], fill=(240, 200, 120))  # optic-disc-like bright spot
    if cls == "spots":
        for _ in range(int(rng.integers(8, 16))):
            x, y = rng.integers(size // 4, 3 * size // 4, size=2)
            s = int(rng.integers(max(2, size // 60), max(3, size // 30)))
            d.ellipse([x - s, y - s, x + s, y + s], fill=(255, 240, 100))
    elif cls == "vessels":
        for _ in range(int(rng.integers(4, 7))):
            pts = [tuple(int(v) for v in rng.integers(size // 5, 4 * size // 5, size=2)) for _ in range(4)]
            d.line(pts, fill=(70, 10, 10), width=max(2, size // 50))
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_data")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--train", type=int, default=24, help="images per class in train/")
    ap.add_argument("--val", type=int, default=8, help="images per class in val/")
    ap.add_argument("--test", type=int, default=8, help="images per class in test/")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    for split, n in (("train", args.train), ("val", args.val), ("test", args.test)):
        for cls in CLASSES:
            folder = os.path.join(args.out, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                make_image(cls, rng, args.size).save(os.path.join(folder, f"{cls}_{i:03d}.png"))
    print(f"synthetic demo data (not real retinal images): {args.out}/{{train,val,test}}/{{{','.join(CLASSES)}}}")


if __name__ == "__main__":
    main()
