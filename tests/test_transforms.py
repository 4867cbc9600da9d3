# Derived from: timm 0.9.16 tests' style (small inputs, parity vs the original code path) and
# rmaphoh/RETFound util/datasets.py:build_transform; written anew.
"""Train/eval transforms vs torchvision + timm 0.9.16 (the original's stack)."""
import math
import random

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from util_mindspore import auto_augment as ours_aa
from util_mindspore.datasets import pil_loader
from util_mindspore.transforms import (EvalTransform, TrainTransform, erase_boxes, random_erasing,
                                       rrc_params, to_tensor_normalize)

P_MIN = 1e-3  # statistical tests: fixed seeds, reject parity only below this p-value


def _rand_rgb(h, w, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def _smooth_rgb(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx + yy) % 256], -1)
    return Image.fromarray(a.astype(np.uint8))


def _save_modes(tmp_path):
    """Files in many modes; returns their paths."""
    rs = np.random.RandomState(1)
    paths = []
    rgb = Image.fromarray(rs.randint(0, 256, (61, 83, 3), dtype=np.uint8))
    for name, img, ext in [
        ('rgb', rgb, 'png'),
        ('l', rgb.convert('L'), 'png'),
        ('rgba', Image.fromarray(rs.randint(0, 256, (70, 45, 4), dtype=np.uint8)), 'png'),
        ('p', rgb.convert('P', palette=Image.ADAPTIVE, colors=17), 'png'),
        ('i16', Image.fromarray(rs.randint(0, 65535, (50, 77), dtype=np.uint16)), 'png'),
        ('cmyk', rgb.convert('CMYK'), 'jpg'),
        ('jpg', rgb, 'jpg'),
        ('tall', rgb.transpose(Image.TRANSPOSE), 'bmp'),
    ]:
        p = tmp_path / f'{name}.{ext}'
        img.save(p)
        paths.append(str(p))
    return paths


# ---------------------------------------------------------------- eval transform
@pytest.mark.torch
@pytest.mark.parametrize('input_size', [24, 56, 224, 256])
def test_eval_transform_matches_torchvision(tmp_path, input_size):
    from torchvision import transforms as T
    from torchvision.datasets.folder import default_loader
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    ref = T.Compose([T.Resize(int(input_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                     T.CenterCrop(input_size), T.ToTensor(),
                     T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ours = EvalTransform(input_size)
    for p in _save_modes(tmp_path):
        a = ours(pil_loader(p))
        b = ref(default_loader(p)).numpy()
        assert a.shape == b.shape == (3, input_size, input_size) and a.dtype == np.float32
        assert np.abs(a - b).max() <= 1e-6, p


@pytest.mark.torch
def test_to_tensor_normalize_bit_exact():
    import torch
    from torchvision import transforms as T
    img = _rand_rgb(9, 7)
    ref = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(T.ToTensor()(img)).numpy()
    assert np.array_equal(to_tensor_normalize(img), ref)
    assert torch.__version__  # keep the import meaningful


def test_to_tensor_normalize_lookup_equals_formula():
    """The table lookup gives the same bits as (x/255 - mean)/std for every uint8 value and channel."""
    x = np.stack([np.roll(np.arange(256, dtype=np.uint8), 7 * c) for c in range(3)], -1).reshape(16, 16, 3)
    m = np.asarray((0.485, 0.456, 0.406), dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray((0.229, 0.224, 0.225), dtype=np.float32).reshape(-1, 1, 1)
    ref = (x.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0) - m) / s
    got = to_tensor_normalize(Image.fromarray(x))
    assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, ref)
    gray = to_tensor_normalize(Image.fromarray(x[:, :, 0]), (0.5,), (0.25,))  # other paths unchanged
    assert np.array_equal(gray, ((x[None, :, :, 0].astype(np.float32) / np.float32(255.0)) - np.float32(0.5))
                          / np.float32(0.25))


# ---------------------------------------------------------------- RandAugment ops
ALL_OPS = sorted(set(ours_aa.RAND_TRANSFORMS) | set(ours_aa.RAND_INCREASING_TRANSFORMS))


class _FixedRng:
    """Generator stand-in whose random() returns a constant (controls the sign of signed ops)."""

    def __init__(self, v):
        self.v = v

    def random(self):
        return self.v


@pytest.mark.torch
@pytest.mark.parametrize('name', ALL_OPS)
@pytest.mark.parametrize('magnitude', [3.0, 9.0])
@pytest.mark.parametrize('sign_draw', [0.2, 0.8])
def test_rand_augment_op_matches_timm(monkeypatch, name, magnitude, sign_draw):
    import timm.data.auto_augment as taa
    hp = dict(translate_const=int(40 * 0.45), img_mean=(124, 116, 104), interpolation=Image.BICUBIC)
    img = _smooth_rgb(40, 52)
    op = taa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hp)
    monkeypatch.setattr(taa.random, 'random', lambda: sign_draw)  # timm's _randomly_negate
    ref = np.asarray(op(img), dtype=np.int16)
    got = np.asarray(ours_aa.apply_op(img, name, magnitude, _FixedRng(sign_draw), hp), dtype=np.int16)
    assert got.shape == ref.shape
    assert np.array_equal(got, ref), name  # bit-exact: same PIL calls with the same arguments


def test_posterize_zero_bits_is_black():
    img = _smooth_rgb(8, 8)
    out = ours_aa.apply_op(img, 'PosterizeIncreasing', 10.0, np.random.default_rng(0), {})
    assert np.asarray(out).max() == 0
    assert np.array_equal(np.asarray(ours_aa.posterize(img, 4)), np.asarray(img) & 0xF0)


def _record_ours(monkeypatch, cfg, n, seed=0):
    log = []
    for name in ALL_OPS:
        monkeypatch.setitem(ours_aa.NAME_TO_OP, name,
                            (lambda nm: lambda img, *a, **k: (log.append((nm, a[0] if a else None)), img)[1])(name))
    ra = ours_aa.rand_augment_transform(cfg, dict(translate_const=100, img_mean=(124, 116, 104)))
    rng = np.random.default_rng(seed)
    img = Image.new('RGB', (4, 4))
    counts = []
    for _ in range(n):
        before = len(log)
        ra(img, rng)
        counts.append(len(log) - before)
    return log, counts


def _record_timm(cfg, n, seed=0):
    import timm.data.auto_augment as taa
    random.seed(seed)
    np.random.seed(seed)
    ra = taa.rand_augment_transform(cfg, dict(translate_const=100, img_mean=(124, 116, 104)))
    log = []
    for op in ra.ops:
        op.aug_fn = (lambda nm: lambda img, *a, **k: (log.append((nm, a[0] if a else None)), img)[1])(op.name)
    img = Image.new('RGB', (4, 4))
    counts = []
    for _ in range(n):
        before = len(log)
        ra(img)
        counts.append(len(log) - before)
    return log, counts


@pytest.mark.torch
@pytest.mark.parametrize('cfg', ['rand-m9-mstd0.5-inc1', 'rand-m7-n3-mstd1-p0.7'])
def test_rand_augment_distribution_matches_timm(monkeypatch, cfg):
    n = 3000
    log_o, cnt_o = _record_ours(monkeypatch, cfg, n)
    log_t, cnt_t = _record_timm(cfg, n)
    names = sorted({nm for nm, _ in log_o} | {nm for nm, _ in log_t})
    expected = ours_aa.RAND_INCREASING_TRANSFORMS if 'inc1' in cfg else ours_aa.RAND_TRANSFORMS
    assert set(names) == set(expected)
    # ops applied per image (0..n_layers) and op choice: chi-square homogeneity
    k = max(cnt_o + cnt_t) + 1
    table = np.array([np.bincount(cnt_o, minlength=k), np.bincount(cnt_t, minlength=k)])
    assert stats.chi2_contingency(table[:, table.sum(0) > 0])[1] > P_MIN
    table = np.array([[sum(1 for m, _ in log if m == nm) for nm in names] for log in (log_o, log_t)])
    assert stats.chi2_contingency(table)[1] > P_MIN
    # op arguments (magnitude noise, clipping, random sign): KS per op
    for nm in ('Rotate', 'ShearX', 'TranslateXRel', 'SolarizeAdd', 'ContrastIncreasing', 'Contrast',
               'PosterizeIncreasing', 'Posterize', 'SolarizeIncreasing'):
        a = [v for m, v in log_o if m == nm]
        b = [v for m, v in log_t if m == nm]
        if nm in names:
            assert stats.ks_2samp(a, b).pvalue > P_MIN, nm


def test_rand_augment_config_parsing():
    ra = ours_aa.rand_augment_transform('rand-m9-mstd0.5-inc1', {})
    assert (ra.magnitude, ra.magnitude_std, ra.num_layers, ra.prob) == (9, 0.5, 2, 0.5)
    assert ra.names == ours_aa.RAND_INCREASING_TRANSFORMS
    # PARITY: timm treats 'inc0' as increasing too (bool('0') is True)
    assert ours_aa.rand_augment_transform('rand-m9-inc0', {}).names == ours_aa.RAND_INCREASING_TRANSFORMS
    assert ours_aa.rand_augment_transform('rand-m5-n3', {}).names == ours_aa.RAND_TRANSFORMS
    assert ours_aa.rand_augment_transform('rand-mstd101', {}).magnitude_std == float('inf')
    with pytest.raises(ValueError):
        ours_aa.rand_augment_transform('rand-m9-q3', {})


def test_train_transform_flags():
    t = TrainTransform(224, auto_augment='rand-m9-mstd0.5-inc1', color_jitter=0.4)
    assert t.rand_augment is not None and t.color_jitter is None  # timm: jitter off when AA on
    assert t.rand_augment.hparams['translate_const'] == 100
    assert t.rand_augment.hparams['img_mean'] == (124, 116, 104)
    for off in (None, 'none', 'None', ''):
        t = TrainTransform(32, auto_augment=off, color_jitter=0.4)
        assert t.rand_augment is None and t.color_jitter == (0.4, 0.4, 0.4)
    with pytest.raises(NotImplementedError):
        TrainTransform(32, auto_augment='original')


@pytest.mark.torch
@pytest.mark.parametrize('jitter', [None, 0.4], ids=['plain', 'color_jitter'])
def test_train_transform_replays_torchvision_ops(jitter):
    """With RandAugment off (and random erasing off), TrainTransform is torchvision's ops with the
    same draws, bit for bit: resized_crop with BICUBIC, hflip when rand < 0.5, ColorJitter's
    brightness/contrast/saturation in its random order, ToTensor + Normalize. The draws are replayed
    from a copy of the generator in the order TrainTransform makes them; what is checked is that
    every step is torchvision's operation with timm's arguments."""
    import copy
    import torch
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    img = _rand_rgb(90, 130, seed=3)
    t = TrainTransform(48, auto_augment='none', color_jitter=jitter, re_prob=0.0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    flips = set()
    for seed in range(10):
        rng = np.random.default_rng(seed)
        replay = copy.deepcopy(rng)
        got = t(img, rng)
        top, left, h, w = rrc_params(img.size[0], img.size[1], replay)
        ref = TF.resized_crop(img, top, left, h, w, [48, 48], interpolation=InterpolationMode.BICUBIC)
        flip = replay.random() < 0.5
        flips.add(flip)
        if flip:
            ref = TF.hflip(ref)
        if jitter is not None:
            adjust = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation}
            for k in replay.permutation(4):
                if k != 3:
                    ref = adjust[int(k)](ref, replay.uniform(1 - jitter, 1 + jitter))
        ref = TF.normalize(TF.to_tensor(ref), mean, std).numpy()
        assert got.dtype == np.float32 and np.array_equal(got, ref), seed
    assert flips == {True, False}


@pytest.mark.torch
def test_train_transform_rand_augment_is_the_originals():
    """The RandAugment that TrainTransform builds for the original's default --aa has timm's ops,
    magnitudes, probabilities and op arguments (fill colour, BICUBIC resampling) as the original's
    timm create_transform(..., interpolation='bicubic') builds them."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment as TimmRandAugment
    aa = 'rand-m9-mstd0.5-inc1'
    ref = create_transform(224, is_training=True, color_jitter=None, auto_augment=aa, interpolation='bicubic',
                           re_prob=0.25, re_mode='pixel', re_count=1, mean=(0.485, 0.456, 0.406),
                           std=(0.229, 0.224, 0.225))
    ref_ra = [tr for tr in ref.transforms if isinstance(tr, TimmRandAugment)]
    assert len(ref_ra) == 1
    ref_ra = ref_ra[0]
    ours = TrainTransform(224, auto_augment=aa, re_prob=0.25, re_mode='pixel').rand_augment
    assert ours.names == [op.name for op in ref_ra.ops]
    assert ours.num_layers == ref_ra.num_layers
    for op in ref_ra.ops:
        assert (ours.prob, ours.magnitude, ours.magnitude_std) == (op.prob, op.magnitude, op.magnitude_std)
        assert ours.magnitude_max == op.magnitude_max  # None: clipped at 10 (_LEVEL_DENOM)
        assert ours.hparams['translate_const'] == op.hparams['translate_const']
        assert ours.hparams['img_mean'] == op.kwargs['fillcolor']
        assert ours.hparams['interpolation'] == op.kwargs['resample'] == Image.BICUBIC


def test_train_transform_deterministic_per_rng():
    t = TrainTransform(32, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='pixel')
    img = _smooth_rgb(50, 70)
    a = t(img, np.random.default_rng([0, 1, 0, 5]))
    b = t(img, np.random.default_rng([0, 1, 0, 5]))
    c = t(img, np.random.default_rng([0, 2, 0, 5]))
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---------------------------------------------------------------- RandomResizedCrop
class _AlwaysFail:
    """Draws that make every RRC attempt too large (scale 1, extreme aspect) -> fallback box."""

    def uniform(self, lo, hi):
        return hi


@pytest.mark.torch
@pytest.mark.parametrize('size', [(120, 80), (300, 60)])  # (w, h); 300x60 exercises the fallback
def test_rrc_box_distribution_matches_timm(size):
    from timm.data.transforms import RandomResizedCropAndInterpolation as RRC
    w, h = size
    img = Image.new('RGB', (w, h))
    random.seed(0)
    n = 6000
    ref = np.array([RRC.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
    rng = np.random.default_rng(0)
    got = np.array([rrc_params(w, h, rng) for _ in range(n)])
    assert (got[:, 0] + got[:, 2] <= h).all() and (got[:, 1] + got[:, 3] <= w).all()
    for k in range(4):  # top, left, height, width
        assert stats.ks_2samp(got[:, k], ref[:, k]).pvalue > P_MIN, k
    # fallback (centre crop after 10 failed attempts): same rate, same box
    fallback = np.array(rrc_params(w, h, _AlwaysFail()))
    rate = lambda a: np.mean((a == fallback).all(1))  # noqa: E731
    assert abs(rate(got) - rate(ref)) < 0.02
    if w / h > 3:
        assert rate(ref) > 0.05 and tuple(fallback) == (0, (w - round(h * 4 / 3)) // 2, h, round(h * 4 / 3))


# ---------------------------------------------------------------- random erasing
@pytest.mark.torch
@pytest.mark.parametrize('count', [1, 3])
def test_random_erasing_matches_timm(count):
    import torch
    from timm.data.random_erasing import RandomErasing
    n, shape = 1500, (3, 24, 32)
    random.seed(0)
    torch.manual_seed(0)
    re = RandomErasing(0.4, mode='pixel', max_count=count, device='cpu')
    area_t, area_o = [], []
    for _ in range(n):
        x = torch.zeros(shape)
        re(x)
        area_t.append(int((x[0] != 0).sum()))
    rng = np.random.default_rng(0)
    for _ in range(n):
        x = random_erasing(np.zeros(shape, np.float32), rng, 0.4, 'pixel', count)
        area_o.append(int((x[0] != 0).sum()))
    area_t, area_o = np.array(area_t), np.array(area_o)
    assert abs((area_o > 0).mean() - (area_t > 0).mean()) < 0.06
    assert stats.ks_2samp(area_o[area_o > 0], area_t[area_t > 0]).pvalue > P_MIN
    # single box: aspect h/w log-uniform in [0.3, 1/0.3] (timm), not w/h uniform (mindspore)
    rng = np.random.default_rng(1)
    boxes = [b for _ in range(3000) for b in erase_boxes((3, 200, 200), rng, 1.0)]
    logr = np.log([h / w for _, _, h, w in boxes])
    assert abs(np.mean(logr)) < 0.05 and stats.kstest(
        logr, stats.uniform(math.log(0.3), -2 * math.log(0.3)).cdf).pvalue > P_MIN


def test_random_erasing_after_normalisation_pixel_noise():
    t = TrainTransform(64, auto_augment=None, re_prob=1.0, re_mode='pixel')
    img = Image.new('RGB', (80, 80), (124, 116, 104))
    x = t(img, np.random.default_rng(3))
    const = to_tensor_normalize(Image.new('RGB', (1, 1), (124, 116, 104)))[:, 0, 0]
    erased = ~np.isclose(x, const[:, None, None], atol=1e-6)
    assert erased.any()
    noise = x[erased]
    assert noise.size > 100 and abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2
    # per-pixel: the erased box is not constant across pixels of one channel
    assert np.unique(x[0][erased[0]]).size > 50
