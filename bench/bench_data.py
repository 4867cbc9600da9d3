# Derived from: rmaphoh/RETFound util/datasets.py + main_finetune.py (the torch data path it
# times against); written anew.
"""Images/s of our data pipeline (create_loader, numpy/PIL in mindspore.dataset) vs the original's
(torchvision ImageFolder + timm create_transform + torch DataLoader), same worker count, interleaved.

Each run builds both loaders and iterates them for ``--epochs`` epochs as the training loop does
(``set_epoch(e)`` then one pass), alternating epoch by epoch between ours and torch so both see the
same background load. Reported separately: the first epoch (building the loader + its first pass:
includes starting the pipeline and its worker processes), the first epoch of a loader built ``--gap``
seconds before (as in main_finetune, which builds the model in between: our loader starts its
workers and its idle pass in the background; torch's DataLoader does nothing before ``iter``), and
the steady state (epochs 2.., images / wall time). The torch side is the original's DataLoader
without ``persistent_workers``: it starts its workers every epoch.
Medians over ``--repeats`` runs in one process; the per-run ratios are printed too.

    .venv/bin/python bench/bench_data.py --n 64 --workers 2 --epochs 3 --repeats 3

The table is printed and written to bench/RESULTS_data.md (``--out``) with the machine and the
command; bench/bench_model.py puts that file's table next to the model images/s in its results.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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


def _pillow10_posterize():
    """timm's PosterizeIncreasing at magnitude 10 asks for bits=0: Pillow >= 11 raises, the
    original's pinned Pillow 10.2 returns a black image. Restore that so the torch side cannot crash."""
    orig = ImageOps.posterize

    def posterize(image, bits):
        return Image.new(image.mode, image.size, 0) if bits == 0 else orig(image, bits)
    ImageOps.posterize = posterize


def _epoch(loader, epoch, set_epoch):
    """(images, seconds) of one epoch, iterated as the training loop does."""
    if set_epoch is not None:
        set_epoch(epoch)
    t = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    return n, time.perf_counter() - t


def ours_loader(args, split, workers, batch):
    ds = build_dataset(split, args)
    ld = create_loader(ds, batch, shuffle=split == 'train', drop_last=False, num_workers=workers)
    return ld, ld.set_epoch, ld.close


def torch_loader(args, split, workers, batch):
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
    return ld, None, lambda: None


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--n', type=int, default=64, help='images per split')
    p.add_argument('--size', type=int, default=1024, help='JPEG side length')
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--epochs', type=int, default=3, help='epochs per run; steady state = epochs 2..')
    p.add_argument('--repeats', type=int, default=3, help='interleaved runs per pipeline; medians reported')
    p.add_argument('--gap', type=float, default=2.0,
                   help='seconds between building a loader and its first epoch in the "built earlier" row '
                        '(main_finetune builds the model in between); 0 skips that row')
    p.add_argument('--out', default=os.path.join(ROOT, 'bench', 'RESULTS_data.md'),
                   help="markdown results file ('' to only print)")
    a = p.parse_args()
    if a.epochs < 2:
        p.error('--epochs must be >= 2 (the first epoch is reported apart from the steady state)')
    _pillow10_posterize()
    import mindspore.dataset  # noqa: F401  (import time is not pipeline time)
    import torch  # noqa: F401
    import timm.data  # noqa: F401
    with tempfile.TemporaryDirectory() as root:
        make_images(root, a.n, a.size)
        args = argparse.Namespace(data_path=root, input_size=a.input_size, aa='rand-m9-mstd0.5-inc1',
                                  color_jitter=None, reprob=0.25, remode='pixel', recount=1,
                                  dataratio='1.0', seed=0, stratified=False)
        first, later, steady = {}, {}, {}
        for _ in range(a.repeats):
            for split in ('train', 'val'):
                # Both loaders live side by side; their epochs alternate (ours, torch, ours, torch ...)
                # so both see the same background load. Epoch 0 includes starting the pipeline.
                runs, built = {}, {}
                for name, make in (('ours', ours_loader), ('torch', torch_loader)):
                    t = time.perf_counter()
                    runs[name] = make(args, split, a.workers, a.batch)
                    built[name] = time.perf_counter() - t  # ours starts its workers here
                for name in runs:
                    steady[(split, name)] = steady.get((split, name), []) + [[0, 0.0]]
                for e in range(a.epochs):
                    for name, (ld, set_epoch, _) in runs.items():
                        n, dt = _epoch(ld, e, set_epoch)
                        if e == 0:  # start-up: building the loader + the first epoch
                            first.setdefault((split, name), []).append(n / (dt + built[name]))
                        else:
                            steady[(split, name)][-1][0] += n
                            steady[(split, name)][-1][1] += dt
                for _, _, close in runs.values():
                    close()
                if a.gap > 0:  # as main_finetune: loaders built, then the model, then the first epoch
                    runs = {name: make(args, split, a.workers, a.batch)
                            for name, make in (('ours', ours_loader), ('torch', torch_loader))}
                    time.sleep(a.gap)
                    for name, (ld, set_epoch, close) in runs.items():
                        n, dt = _epoch(ld, 0, set_epoch)
                        later.setdefault((split, name), []).append(n / dt)
                        close()
        steady = {k: [n / t for n, t in v] for k, v in steady.items()}
    lines = [f'{a.n} JPEGs {a.size}x{a.size} -> {a.input_size}, {a.workers} workers, batch {a.batch}, '
             f'{a.epochs} epochs per run, median of {a.repeats} interleaved runs (images/s)', '',
             '| pipeline | epoch | ours (MindSpore) | original (torch) | ratio ours/torch, median of runs |',
             '|---|---|---|---|---|']
    for split in ('train', 'val'):
        label = 'train (RRC+RandAugment+RE)' if split == 'train' else 'eval (resize+crop)'
        kinds = [('first', first)] + ([(f'first, built {a.gap:g} s before', later)] if a.gap > 0 else [])
        for kind, res in kinds + [(f'2..{a.epochs}', steady)]:
            o, t = statistics.median(res[(split, 'ours')]), statistics.median(res[(split, 'torch')])
            ratios = [x / y for x, y in zip(res[(split, 'ours')], res[(split, 'torch')])]
            lines.append(f'| {label} | {kind} | {o:.1f} | {t:.1f} | {statistics.median(ratios):.2f} '
                         f'(runs {", ".join(f"{r:.2f}" for r in ratios)}) |')
    print('\n' + '\n'.join(lines))
    if a.out:
        cmd = 'bench/bench_data.py ' + ' '.join(sys.argv[1:])
        head = ['# Data pipeline benchmark: MindSpore port vs PyTorch original', '',
                f'- Machine: {_cpu_name()}, {os.cpu_count()} cores; date {datetime.date.today().isoformat()}; '
                f'load average at the end {_load():.1f} (>{os.cpu_count()} means other processes competed).',
                f'- Command: `{cmd.strip()}`', '']
        with open(a.out, 'w') as f:
            f.write('\n'.join(head + lines) + '\n')
        print(f'\nwritten to {a.out}')


def _cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or '?'


def _load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float('nan')


if __name__ == '__main__':
    main()
