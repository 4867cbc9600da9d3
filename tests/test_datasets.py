# Derived from: rmaphoh/RETFound util/datasets.py (build_dataset, _stratified_indices),
# main_finetune.py (DistributedSampler use) and torchvision ImageFolder behaviour; written anew.
"""ImageFolder semantics, torch-identical subsampling/sharding, loader, bad-input errors."""
import argparse
import io
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from util_mindspore.datasets import (DatasetError, ImageFolder, build_dataset, check_data_layout,
                                     create_loader, pil_loader, sample_rng, scan_images, shard_indices, check_image,
                                     stratified_indices, subsample_indices, torch_randperm)


def _img(path, size=(12, 10), seed=0, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path, format=fmt)


def _layout(root, classes=('a', 'b'), per_class=3, splits=('train', 'val', 'test')):
    for sp in splits:
        for c in classes:
            for k in range(per_class):
                _img(os.path.join(root, sp, c, f'{k}.png'), seed=k)
    return str(root)


def _args(root, **kw):
    d = dict(data_path=str(root), input_size=16, aa='rand-m9-mstd0.5-inc1', color_jitter=None, reprob=0.25,
             remode='pixel', recount=1, dataratio='1.0', seed=0, stratified=False)
    d.update(kw)
    return argparse.Namespace(**d)


# ---------------------------------------------------------------- ImageFolder
def _odd_tree(root):
    for rel in ['B class/x.JPG', 'B class/y.Png', 'B class/sub dir/z.jpeg', 'a_class/é ü.png',
                'a_class/1.TIFF', 'a_class/2.bmp', 'Zeta/q.webp', 'Zeta/w.PPM', '10/n.png', '9/n.png']:
        fmt = {'.jpg': 'JPEG', '.jpeg': 'JPEG', '.png': 'PNG', '.tiff': 'TIFF', '.bmp': 'BMP',
               '.webp': 'WEBP', '.ppm': 'PPM'}[os.path.splitext(rel)[1].lower()]
        _img(os.path.join(root, rel), fmt=fmt)
    for junk in ['B class/notes.txt', 'a_class/Thumbs.db', 'Zeta/.DS_Store', 'a_class/data.csv']:
        with open(os.path.join(root, junk), 'w') as f:
            f.write('not an image')


@pytest.mark.torch
def test_imagefolder_matches_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder as TVImageFolder
    _odd_tree(tmp_path)
    ours, ref = ImageFolder(str(tmp_path)), TVImageFolder(str(tmp_path))
    assert ours.classes == ref.classes == ['10', '9', 'B class', 'Zeta', 'a_class']
    assert ours.class_to_idx == ref.class_to_idx
    assert ours.samples == ref.samples and ours.targets == ref.targets
    assert len(ours) == 10


@pytest.mark.torch
def test_each_split_is_indexed_by_its_own_class_folders_as_the_original(tmp_path):
    """The original builds one torchvision ImageFolder per split. An --eval whose test/ holds other
    classes than an existing train/ must label test/ by its own folders (it used to take train/'s
    list, silently dropping test/'s extra class and shifting the names on the confusion matrix)."""
    from torchvision.datasets import ImageFolder as TVImageFolder
    _layout(tmp_path, classes=('a', 'b', 'c'), splits=('train',))
    _layout(tmp_path, classes=('a', 'c', 'd'), splits=('test',))
    ours = build_dataset('test', _args(tmp_path))
    ref = TVImageFolder(os.path.join(tmp_path, 'test'))
    assert ours.classes == ref.classes == ['a', 'c', 'd']
    assert ours.samples == ref.samples and ours.targets == ref.targets == [0] * 3 + [1] * 3 + [2] * 3
    assert check_data_layout(str(tmp_path), 3, need=('test',)) == ['a', 'c', 'd']


def test_hidden_files_and_dirs_ignored(tmp_path):
    _odd_tree(tmp_path)
    _img(os.path.join(tmp_path, '.ipynb_checkpoints', 'c.png'))             # hidden class folder
    _img(os.path.join(tmp_path, 'Zeta', '.ipynb_checkpoints', 'c.png'))     # hidden sub folder
    _img(os.path.join(tmp_path, 'Zeta', '._q.jpg'), fmt='PNG')              # macOS resource fork
    ds = ImageFolder(str(tmp_path))
    assert '.ipynb_checkpoints' not in ds.classes and len(ds.classes) == 5
    assert not any('/.' in p for p, _ in ds.samples) and len(ds) == 10


@pytest.mark.torch
def test_pil_loader_matches_torchvision_incl_exif(tmp_path):
    from torchvision.datasets.folder import default_loader
    p = str(tmp_path / 'exif.jpg')
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (10, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 -- torchvision does NOT apply it
    img.save(p, exif=exif.tobytes())
    a, b = pil_loader(p), default_loader(p)
    assert a.size == b.size == (20, 10) and a.mode == 'RGB'
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_getitem_and_build_dataset(tmp_path):
    root = _layout(tmp_path)
    tr, va = build_dataset('train', _args(root)), build_dataset('val', _args(root))
    x, y = tr[0]
    assert x.shape == (3, 16, 16) and x.dtype == np.float32 and y == 0
    assert va.classes == tr.classes and va.root.endswith('val')
    assert np.array_equal(va[1][0], va[1][0])  # eval is deterministic


# ---------------------------------------------------------------- torch-identical subsampling
@pytest.mark.torch
def test_randperm_equals_torch():
    import torch
    for n in (0, 1, 2, 7, 100, 3001):
        for seed in (0, 1, 2026, 123456789, 2 ** 40 + 3):
            ref = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
            assert torch_randperm(n, seed) == ref, (n, seed)


def _original_stratified(targets, ratio, seed):
    """The original util/datasets.py:_stratified_indices, restated as a test fixture (torch)."""
    import torch
    t = torch.as_tensor(targets)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(t).tolist():
        cls_idx = torch.nonzero(t == c, as_tuple=False).view(-1)
        k = max(1, int(round(len(cls_idx) * ratio)))
        keep.extend(cls_idx[torch.randperm(len(cls_idx), generator=g)[:k]].tolist())
    g2 = torch.Generator().manual_seed(seed + 1)
    return torch.tensor(keep)[torch.randperm(len(keep), generator=g2)].tolist()


@pytest.mark.torch
def test_dataratio_and_stratified_equal_original():
    import torch
    targets = np.random.RandomState(0).randint(0, 4, 503).tolist()
    for seed in (0, 7):
        for ratio in (0.1, 0.25, 0.5):
            assert stratified_indices(targets, ratio, seed) == _original_stratified(targets, ratio, seed)
            ref = torch.randperm(503, generator=torch.Generator().manual_seed(seed))[:int(503 * ratio)].tolist()
            assert subsample_indices(targets, str(ratio), seed) == ref
    assert subsample_indices(targets, '1.0', 0) is None


def test_build_dataset_subsamples_train_only(tmp_path):
    root = _layout(tmp_path, per_class=5)
    full = build_dataset('train', _args(root))
    sub = build_dataset('train', _args(root, dataratio='0.4', stratified=True))
    assert len(sub) == 4 and sorted(sub.targets) == [0, 0, 1, 1]
    assert [s for s in sub.samples] == [full.samples[i] for i in sub.indices]
    assert len(build_dataset('val', _args(root, dataratio='0.4'))) == 10


# ---------------------------------------------------------------- sharding / loader
@pytest.mark.torch
@pytest.mark.parametrize('n,shards', [(10, 3), (7, 2), (8, 4), (5, 1)])
def test_shards_equal_distributed_sampler(n, shards):
    import torch
    from torch.utils.data import DistributedSampler
    for epoch in (0, 3):
        for r in range(shards):
            s = DistributedSampler(list(range(n)), num_replicas=shards, rank=r, shuffle=True, seed=4)
            s.set_epoch(epoch)
            assert shard_indices(n, True, 4, epoch, shards, r) == list(s)
    assert torch.__version__


def test_shard_union_and_epoch_reshuffle():
    n, shards = 11, 3
    parts = [shard_indices(n, True, 0, 1, shards, r) for r in range(shards)]
    assert len({len(p) for p in parts}) == 1 and set().union(*parts) == set(range(n))
    assert sum(map(len, parts)) == 12  # padded to a multiple of the shard count
    assert shard_indices(n, True, 0, 1, shards, 0) == parts[0]           # same on every call/rank
    assert shard_indices(n, True, 0, 2, shards, 0) != parts[0]           # new epoch, new order
    assert shard_indices(n, False, 0, 5, 1, 0) == list(range(n))


def test_loader_batches_and_worker_independence(tmp_path):
    root = _layout(tmp_path, per_class=5, splits=('train',))
    ds = build_dataset('train', _args(root))
    ld = create_loader(ds, 4, shuffle=True, drop_last=True, num_workers=1, seed=3)
    ld.set_epoch(2)
    b1 = list(ld)
    assert len(ld) == len(b1) == 2
    x, y = b1[0]
    assert x.shape == (4, 3, 16, 16) and x.dtype == np.float32 and y.dtype == np.int32 and y.shape == (4,)
    ld2 = create_loader(ds, 4, shuffle=True, drop_last=True, num_workers=99, seed=3)
    assert ld2.num_workers == min(99, os.cpu_count())
    ld2.set_epoch(2)
    b2 = list(ld2)
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(b1, b2))
    ld.set_epoch(3)
    assert not np.array_equal(list(ld)[0][0], b1[0][0])
    ev = create_loader(build_dataset('train', _args(root, input_size=16)), 4, False, False, 1,
                       num_shards=2, shard_id=1)
    assert len(ev) == 2 and [len(b[1]) for b in ev] == [4, 1]


def _reference_batches(ld):
    """Per-sample reference: the loader's epoch order, each sample loaded with its own generator,
    stacked in batches (drop_last drops the remainder)."""
    idx = ld.indices()
    if ld.drop_last:
        idx = idx[:len(ld) * ld.batch_size]
    out = []
    for k in range(0, len(idx), ld.batch_size):
        items = [ld.dataset.load(i, sample_rng(ld.seed, ld.epoch, ld.shard_id, i)) for i in idx[k:k + ld.batch_size]]
        out.append((np.stack([x for x, _ in items]), np.array([y for _, y in items], dtype=np.int32)))
    return out


def _same(got, ref):
    return len(got) == len(ref) and all(a.dtype == b.dtype and np.array_equal(a, b)
                                        for p, q in zip(got, ref) for a, b in zip(p, q))


@pytest.mark.parametrize('workers', [1, 2])
def test_persistent_loader_epochs_match_reference(tmp_path, workers):
    root = _layout(tmp_path, per_class=5, splits=('train',))
    ld = create_loader(build_dataset('train', _args(root)), 4, shuffle=True, drop_last=True,
                       num_workers=workers, seed=3)
    orders, pipe = [], None
    for epoch in (0, 1, 2):
        ld.set_epoch(epoch)
        got = list(ld)
        assert len(got) == len(ld) == 2 and _same(got, _reference_batches(ld)), epoch
        orders.append(ld.indices()[:8])
        assert pipe is None or ld._pipe is pipe  # one pipeline (and worker pool) for all epochs
        pipe = ld._pipe
    assert len({tuple(o) for o in orders}) == 3  # set_epoch changes the order every epoch
    ld.set_epoch(1)  # going back replays epoch 1 exactly
    assert _same(list(ld), _reference_batches(ld))
    ld.set_epoch(4)  # an unfinished pass is abandoned, the next one is still right
    it = iter(ld)
    next(it)
    del it
    ld.set_epoch(5)
    assert _same(list(ld), _reference_batches(ld))
    ld.close()
    assert ld._pipe is None and _same(list(ld), _reference_batches(ld))  # restarts after close()
    ld.close()


def test_persistent_eval_loader_and_worker_cleanup(tmp_path):
    import psutil
    root = _layout(tmp_path, per_class=5, splits=('train',))
    ds = build_dataset('train', _args(root))
    me = psutil.Process()
    before = len(me.children(recursive=True))
    ev = create_loader(ds, 4, False, False, 2, num_shards=2, shard_id=1)
    for _ in range(3):  # an eval loader is iterated once per epoch without set_epoch
        got = list(ev)
        assert [len(b[1]) for b in got] == [4, 1] and _same(got, _reference_batches(ev))
    assert len(me.children(recursive=True)) > before
    ev.close()
    for _ in range(3):  # loaders dropped without close() release their workers too
        tmp = create_loader(ds, 4, True, True, 2)
        list(tmp)
        del tmp
    import gc
    gc.collect()
    assert len(me.children(recursive=True)) == before


def test_loader_forks_its_workers_when_built(tmp_path):
    """The workers must exist when create_loader returns (MindSpore itself forks them only at the
    first next()): memory the trainer allocates and rewrites afterwards must not be pinned in them."""
    import psutil
    root = _layout(tmp_path, per_class=5, splits=('train',))
    ds = build_dataset('train', _args(root))
    me = psutil.Process()
    before = {c.pid for c in me.children(recursive=True)}
    ev = create_loader(ds, 4, False, False, 2)
    workers = [c for c in me.children(recursive=True) if c.pid not in before]
    assert len(workers) >= 2  # two workers (and MindSpore's cleaning process) are already forked
    rss = {c.pid: c.memory_info().rss for c in workers}
    big = np.ones(256 * 2 ** 20 // 8)  # the model and optimizer state, allocated after the loader
    got = list(ev)  # the first evaluation: before, MindSpore forked the workers here
    big += 1  # a training step rewrites that memory: a worker forked after it would keep a copy
    assert _same(got, _reference_batches(ev))
    assert {c.pid for c in me.children(recursive=True) if c.pid not in before} == set(rss)  # no new forks
    for c in workers:
        assert c.memory_info().rss - rss[c.pid] < 128 * 2 ** 20, (c.pid, c.memory_info().rss, rss[c.pid])
    del big
    ev.close()
    create_loader(ds, 4, True, True, 2).close()  # closing while the idle pass drains does not hang
    import gc
    gc.collect()
    assert {c.pid for c in me.children(recursive=True)} <= before


def test_loader_follows_dataset_changes(tmp_path):
    root = _layout(tmp_path, per_class=5, splits=('train',))
    ds = build_dataset('train', _args(root))
    ld = create_loader(ds, 4, shuffle=True, drop_last=False, num_workers=1, seed=1)
    assert len(list(ld)) == 3
    ds.subsample([0, 2, 4, 6, 8])  # new .samples: the pipeline is rebuilt for the new length
    got = list(ld)
    assert len(got) == len(ld) == 2 and _same(got, _reference_batches(ld))
    ld.close()


# ---------------------------------------------------------------- bad input
def test_layout_errors(tmp_path):
    root = _layout(tmp_path / 'ok')
    assert check_data_layout(root, 2) == ['a', 'b']
    with pytest.raises(DatasetError, match='no test/'):
        check_data_layout(_layout(tmp_path / 'nosplit', splits=('train', 'val')), 2)
    bad = _layout(tmp_path / 'mismatch')
    _img(os.path.join(bad, 'train', 'c', '0.png'))
    with pytest.raises(DatasetError, match=r"val/ has classes \[a, b\] but train/ has \[a, b, c\]"):
        check_data_layout(bad, 3)
    empty = _layout(tmp_path / 'empty')
    for sp in ('train', 'val', 'test'):
        os.makedirs(os.path.join(empty, sp, 'c'))
        with open(os.path.join(empty, sp, 'c', 'readme.txt'), 'w') as f:
            f.write('x')
    with pytest.raises(DatasetError, match=r"class folder\(s\) \[c\] contain no images"):
        check_data_layout(empty, 3)
    with pytest.raises(DatasetError, match='--nb_classes 5 .* 2 class folders .*pass --nb_classes 2'):
        check_data_layout(root, 5)
    os.makedirs(tmp_path / 'nocls' / 'train')
    with pytest.raises(DatasetError, match='no class folders'):
        check_data_layout(str(tmp_path / 'nocls'), need=('train',))


def _png_with_damaged_data(path, size=64):
    """A PNG whose compressed image data is damaged but whose chunk CRCs are recomputed: it passes
    verify() (and so the pre-flight check) and fails only when decoded."""
    import struct
    import zlib
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, 'PNG')
    data = bytearray(buf.getvalue())
    at = data.index(b'IDAT')
    length = struct.unpack('>I', data[at - 4:at])[0]
    body = bytearray(data[at + 4:at + 4 + length])
    body[len(body) // 2:len(body) // 2 + 8] = b'\xff' * 8
    data[at + 4:at + 4 + length] = body
    data[at + 4 + length:at + 8 + length] = struct.pack('>I', zlib.crc32(b'IDAT' + bytes(body)))
    with open(path, 'wb') as f:
        f.write(bytes(data))
    return path


def test_damage_inside_jpeg_data_is_found_before_training(tmp_path):
    """A JPEG damaged inside its compressed data, with its end marker intact, used to pass the
    check and stop training mid-epoch: the check now decodes it (1/8-scale draft)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, 'JPEG')
    good = buf.getvalue()
    damaged = bytearray(good)
    damaged[len(good) // 2:len(good) // 2 + 2] = b'\xff\xda'
    assert damaged.endswith(b'\xff\xd9')
    (tmp_path / 'bad.jpg').write_bytes(bytes(damaged))
    (tmp_path / 'good.jpg').write_bytes(good)
    with pytest.raises(OSError):
        with Image.open(tmp_path / 'bad.jpg') as img:
            img.load()
    assert check_image(str(tmp_path / 'bad.jpg')) is not None
    assert check_image(str(tmp_path / 'good.jpg')) is None


def test_an_image_that_fails_only_when_loaded_names_its_file(tmp_path):
    path = _png_with_damaged_data(str(tmp_path / 'x.png'))
    assert check_image(path) is None  # CRCs are right: the cheap check cannot see it
    with pytest.raises(DatasetError, match=r'unreadable image .*x\.png: OSError: .*Remove or replace the file'):
        pil_loader(path)


def test_scan_images_lists_all_bad_and_skips(tmp_path):
    root = _layout(tmp_path, splits=('train',))
    good_jpg = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(good_jpg, 'JPEG')
    bad = {'a/trunc.jpg': good_jpg.getvalue()[:400], 'a/zero.png': b'',
           'b/text.png': b'hello, not a png', 'b/trunc.png': pathlib.Path(root, 'train/a/0.png').read_bytes()[:-30]}
    for rel, data in bad.items():
        with open(os.path.join(root, 'train', rel), 'wb') as f:
            f.write(data)
    with open(os.path.join(root, 'train', 'a', 'fine.jpg'), 'wb') as f:
        f.write(good_jpg.getvalue())
    ds = build_dataset('train', _args(root))
    assert len(ds) == 11
    with pytest.raises(DatasetError) as e:
        scan_images([ds])
    msg = str(e.value)
    assert msg.startswith('4 unreadable') and '--skip_bad_images' in msg
    for rel in bad:
        assert os.path.join('train', rel) in msg
    assert 'fine.jpg' not in msg and 'zero-byte' in msg
    assert scan_images(ds, skip_bad=True) == 4 and len(ds) == 7
    assert scan_images(ds) == 0
