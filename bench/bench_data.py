# Derived from: rmaphoh/RETFound util/datasets.py + main_finetune.py (the torch data path it
# times against); written anew.
"""Images/s of our data pipeline (create_loader, numpy/PIL in mindspore.dataset) vs the original's
(torchvision ImageFolder + timm create_transform + torch DataLoader), same worker count, interleaved.

    .venv/bin/python bench/bench_data.py --n 64 --workers 2 --repeats 2
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util_mindspore.datasets import build_dataset, create_loader  # noqa: E402


def make_images(root, n, size):
    rs = np.random.RandomState(0)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx % 256, yy % 256, (xx // 4 + yy // 4) % 256], -1).astype(np.uint8)
    for split in ('train', 'val'):
        for k in range(n):
            d = os.path.join(root, split, f'c{k % 2}')
            os.makedirs(d, exist_ok=True)
            noise = rs.randint(0, 32, (size, size, 3), dtype=np.uint8)
            Image.fromarray(base + noise).save(os.path.join(d, f'{k}.jpg'), quality=90)


def run_ours(args, split, workers, batch):
    ds = build_dataset(split, args)
    ld = create_loader(ds, batch, shuffle=split == 'train', drop_last=False, num_workers=workers)
    t = time.perf_counter()
    n = sum(len(y) for _, y in ld)
    return n / (time.perf_counter() - t)


def run_torch(args, split, workers, batch):
    import torch
    from timm.data import create_transform
    from torchvision import datasets, transforms as T
    if split == 'train':
        tf = create_transform(input_size=args.input_size, is_training=True, color_jitter=None,
                              auto_augment=args.aa, interpolation='bicubic', re_prob=args.reprob,
                              re_mode=args.remode, re_count=args.recount)
    else:
        crop_pct = 224 / 256 if args.input_size <= 224 else 1.0
        tf = T.Compose([T.Resize(int(args.input_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                        T.CenterCrop(args.input_size), T.ToTensor(),
                        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = datasets.ImageFolder(os.path.join(args.data_path, split), transform=tf)
    ld = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=split == 'train', num_workers=workers)
    t = time.perf_counter()
    n = sum(len(y) for _, y in ld)
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--n', type=int, default=64)
    p.add_argument('--size', type=int, default=1024)
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--repeats', type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        make_images(root, a.n, a.size)
        args = argparse.Namespace(data_path=root, input_size=a.input_size, aa='rand-m9-mstd0.5-inc1',
                                  color_jitter=None, reprob=0.25, remode='pixel', recount=1,
                                  dataratio='1.0', seed=0, stratified=False)
        res = {}
        for _ in range(a.repeats):  # interleaved: ours, torch, ours, torch ...
            for split in ('train', 'val'):
                for name, fn in (('ours', run_ours), ('torch', run_torch)):
                    res.setdefault((split, name), []).append(fn(args, split, a.workers, a.batch))
    print(f'\n{a.n} JPEGs {a.size}x{a.size} -> {a.input_size}, {a.workers} workers, batch {a.batch}, '
          f'best of {a.repeats} (images/s)\n')
    print('| pipeline | ours (MindSpore) | original (torch) | ratio ours/torch |')
    print('|---|---|---|---|')
    for split in ('train', 'val'):
        o, t = max(res[(split, 'ours')]), max(res[(split, 'torch')])
        label = 'train (RRC+RandAugment+RE)' if split == 'train' else 'eval (resize+crop)'
        print(f'| {label} | {o:.1f} | {t:.1f} | {o / t:.2f} |')


if __name__ == '__main__':
    main()
