# Derived from: timm 0.9.16 timm/data/mixup.py behaviour (the original's Mixup); written anew.
"""Mixup/CutMix vs timm 0.9.16: exact soft targets and mixed images for given draws, and the
distribution of the draws."""
import numpy as np
import pytest
from scipy import stats

from util_mindspore import mixup as ours
from util_mindspore.mixup import Mixup, cutmix_bbox_and_lam, mixup_target, one_hot

P_MIN = 1e-3
B, C, H, W, NC = 6, 3, 12, 16, 5


def _batch(seed=0):
    rs = np.random.RandomState(seed)
    return rs.randn(B, C, H, W).astype(np.float32), rs.randint(0, NC, B)


def test_one_hot_and_target_shapes():
    y = one_hot([2, 0], 4, on_value=0.9, off_value=0.1)
    assert y.dtype == np.float32 and np.allclose(y, [[.1, .1, .9, .1], [.9, .1, .1, .1]])
    t = mixup_target(np.array([0, 1, 2, 3]), 4, lam=0.7, smoothing=0.0)
    assert np.allclose(t.sum(1), 1) and np.allclose(t[0], [0.7, 0, 0, 0.3])


@pytest.mark.torch
@pytest.mark.parametrize('lam', [1.0, 0.7310585786, 0.123456789])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_mixup_target_exact_vs_timm(lam, smoothing):
    import torch
    import timm.data.mixup as tm
    _, y = _batch()
    ref = tm.mixup_target(torch.from_numpy(y), NC, lam, smoothing).numpy()
    assert np.array_equal(mixup_target(y, NC, lam, smoothing), ref)
    lam_vec = np.random.RandomState(1).rand(B, 1).astype(np.float32)
    ref = tm.mixup_target(torch.from_numpy(y), NC, torch.from_numpy(lam_vec), smoothing).numpy()
    assert np.array_equal(mixup_target(y, NC, lam_vec, smoothing), ref)


def _pair(monkeypatch, **kw):
    import timm.data.mixup as tm
    return tm.Mixup(num_classes=NC, **kw), Mixup(num_classes=NC, rng=0, **kw)


@pytest.mark.torch
@pytest.mark.parametrize('use_cutmix', [False, True])
def test_batch_mode_exact_for_given_draws(monkeypatch, use_cutmix):
    import torch
    import timm.data.mixup as tm
    t, o = _pair(monkeypatch, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    lam, box = 0.61, (np.int64(2), np.int64(9), np.int64(3), np.int64(11))
    for m in (t, o):
        monkeypatch.setattr(m, '_params_per_batch', lambda: (lam, use_cutmix))
    monkeypatch.setattr(tm, 'rand_bbox', lambda *a, **k: box)
    monkeypatch.setattr(ours, 'rand_bbox', lambda *a, **k: box)
    x, y = _batch()
    xt, yt = t(torch.from_numpy(x.copy()), torch.from_numpy(y))
    xo, yo = o(x.copy(), y)
    assert np.array_equal(yo, yt.numpy())
    assert np.abs(xo - xt.numpy()).max() <= 1e-6
    lam_eff = 1 - 7 * 8 / (H * W) if use_cutmix else lam  # cutmix: lambda corrected to box area
    assert np.array_equal(yo, mixup_target(y, NC, lam_eff, 0.1))


@pytest.mark.torch
@pytest.mark.parametrize('mode', ['pair', 'elem'])
@pytest.mark.parametrize('with_cutmix', [False, True], ids=['mixup', 'mixup_and_cutmix'])
def test_pair_elem_modes_exact_for_given_draws(monkeypatch, mode, with_cutmix):
    import torch
    import timm.data.mixup as tm
    t, o = _pair(monkeypatch, mixup_alpha=0.8, cutmix_alpha=1.0 if with_cutmix else 0.0, mode=mode,
                 label_smoothing=0.1)
    n = B // 2 if mode == 'pair' else B
    lam = np.array([0.3, 1.0, 0.8, 0.55, 1.0, 0.1][:n], dtype=np.float32)
    cut = np.array([True, False, True, False, True, True][:n]) if with_cutmix else np.zeros(n, bool)
    for m in (t, o):
        monkeypatch.setattr(m, '_params_per_elem', lambda bs: (lam.copy(), cut.copy()))
    box = (np.int64(1), np.int64(7), np.int64(4), np.int64(13))  # (yl, yh, xl, xh): the corrected lambda
    monkeypatch.setattr(tm, 'rand_bbox', lambda *a, **k: box)
    monkeypatch.setattr(ours, 'rand_bbox', lambda *a, **k: box)
    x, y = _batch(3)
    xt, yt = t(torch.from_numpy(x.copy()), torch.from_numpy(y))
    xo, yo = o(x.copy(), y)
    assert yo.dtype == np.float32 and yo.shape == (B, NC)
    assert np.array_equal(yo, yt.numpy())
    assert np.abs(xo - xt.numpy()).max() <= 1e-6
    if with_cutmix:  # the cut elements' lambda is the box-corrected one, 1 - 6 * 9 / (H * W)
        eff = np.where(cut & (lam != 1), np.float32(1 - 6 * 9 / (H * W)), lam).astype(np.float32)
        eff = np.concatenate([eff, eff[::-1]]) if mode == 'pair' else eff
        assert np.allclose(yo, mixup_target(y, NC, eff.reshape(-1, 1), 0.1), atol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize('kw', [dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7),
                                dict(mixup_alpha=0.2), dict(mixup_alpha=0.0, cutmix_alpha=1.0)])
def test_batch_lambda_distribution_vs_timm(kw):
    import timm.data.mixup as tm
    n = 4000
    np.random.seed(0)
    t = tm.Mixup(num_classes=NC, **kw)
    ref = [t._params_per_batch() for _ in range(n)]
    o = Mixup(num_classes=NC, rng=0, **kw)
    got = [o._params_per_batch() for _ in range(n)]
    lt, ct = np.array([r[0] for r in ref]), np.array([r[1] for r in ref])
    lo, co = np.array([r[0] for r in got]), np.array([r[1] for r in got])
    assert abs(lo.__eq__(1.0).mean() - lt.__eq__(1.0).mean()) < 0.04
    assert abs(co.mean() - ct.mean()) < 0.04
    assert stats.ks_2samp(lo, lt).pvalue > P_MIN


@pytest.mark.torch
@pytest.mark.parametrize('minmax', [None, (0.2, 0.8)])
def test_cutmix_box_and_corrected_lambda_distribution_vs_timm(minmax):
    import timm.data.mixup as tm
    n = 4000
    np.random.seed(0)
    lams = np.random.beta(1.0, 1.0, n)
    ref = np.array([tm.cutmix_bbox_and_lam((C, H, W), l, ratio_minmax=minmax)[1] for l in lams])
    rng = np.random.default_rng(0)
    res = [cutmix_bbox_and_lam((C, H, W), l, rng, ratio_minmax=minmax) for l in lams]
    got = np.array([r[1] for r in res])
    assert stats.ks_2samp(got, ref).pvalue > P_MIN
    for (yl, yh, xl, xh), lam in res[:200]:
        assert 0 <= yl <= yh <= H and 0 <= xl <= xh <= W
        assert lam == pytest.approx(1 - (yh - yl) * (xh - xl) / (H * W))


def test_mixup_is_reproducible_and_validates():
    x, y = _batch()
    a = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=NC, rng=5, mode='elem')(x.copy(), y)
    b = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=NC, rng=5, mode='elem')(x.copy(), y)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.allclose(a[1].sum(1), 1, atol=1e-6)
    with pytest.raises(ValueError, match='even'):
        Mixup(num_classes=NC)(x[:5].copy(), y[:5])
    with pytest.raises(ValueError, match='mixup_mode'):
        Mixup(num_classes=NC, mode='batchy')
