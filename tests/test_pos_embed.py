# --------------------------------------------------------
# Tests for util_mindspore/pos_embed.py: sincos tables against the closed formula, and the
# numpy bicubic resampling / interpolate_pos_embed against torch (the original's code path).
# Written for this port; no code copied.
# --------------------------------------------------------
import types

import numpy as np
import pytest

from util_mindspore.pos_embed import (bicubic_resize_torch, get_1d_sincos_pos_embed_from_grid,
                                      get_2d_sincos_pos_embed, interpolate_pos_embed)


def test_sincos_matches_formula():
    d, g = 16, 5
    emb = get_2d_sincos_pos_embed(d, g, cls_token=True)
    assert emb.shape == (1 + g * g, d) and emb.dtype == np.float64
    assert np.all(emb[0] == 0)
    q = d // 4  # frequencies per sin/cos half of each coordinate
    omega = 1.0 / 10000 ** (np.arange(q) / q)
    for i in range(g):  # row (h)
        for j in range(g):  # column (w)
            row = emb[1 + i * g + j]
            # first half encodes grid[0] = the w coordinate (meshgrid puts w first), then h
            np.testing.assert_allclose(row[:q], np.sin(j * omega), atol=1e-12)
            np.testing.assert_allclose(row[q:2 * q], np.cos(j * omega), atol=1e-12)
            np.testing.assert_allclose(row[2 * q:3 * q], np.sin(i * omega), atol=1e-12)
            np.testing.assert_allclose(row[3 * q:], np.cos(i * omega), atol=1e-12)
    assert get_1d_sincos_pos_embed_from_grid(4, np.array([0., 1.])).shape == (2, 4)


def _fake_model(grid, dim, extra=1):
    return types.SimpleNamespace(patch_embed=types.SimpleNamespace(num_patches=grid * grid),
                                 pos_embed=np.zeros((1, extra + grid * grid, dim), np.float32))


@pytest.mark.torch
@pytest.mark.parametrize('src,dst', [(14, 16), (37, 16), (4, 9), (16, 14)])
def test_bicubic_matches_torch(src, dst):
    import torch
    x = np.random.default_rng(src).standard_normal((1, 8, src, src)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(dst, dst), mode='bicubic',
                                          align_corners=False).numpy()
    out = bicubic_resize_torch(x, dst)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-5


@pytest.mark.torch
@pytest.mark.parametrize('src,dst', [(14, 16), (37, 16), (3, 4)])
def test_interpolate_pos_embed_matches_original(src, dst, capsys):
    import torch
    dim = 12
    pe = np.random.default_rng(0).standard_normal((1, 1 + src * src, dim)).astype(np.float32)
    # the original's computation (util/pos_embed.py), with torch
    t = torch.from_numpy(pe)
    tok = t[:, 1:].reshape(-1, src, src, dim).permute(0, 3, 1, 2)
    tok = torch.nn.functional.interpolate(tok, size=(dst, dst), mode='bicubic', align_corners=False)
    ref = torch.cat((t[:, :1], tok.permute(0, 2, 3, 1).flatten(1, 2)), dim=1).numpy()
    ckpt = {'pos_embed': pe.copy(), 'other': 1}
    assert interpolate_pos_embed(_fake_model(dst, dim), ckpt) == (src, dst)
    assert f'Position interpolate from {src}x{src} to {dst}x{dst}' in capsys.readouterr().out
    assert ckpt['pos_embed'].shape == ref.shape
    assert np.abs(ckpt['pos_embed'] - ref).max() <= 1e-5
    np.testing.assert_array_equal(ckpt['pos_embed'][:, 0], pe[:, 0])  # class token untouched


def test_interpolate_pos_embed_same_size_is_noop():
    pe = np.ones((1, 17, 4), np.float32)
    ckpt = {'pos_embed': pe}
    assert interpolate_pos_embed(_fake_model(4, 4), ckpt) is None
    assert ckpt['pos_embed'] is pe
    assert interpolate_pos_embed(_fake_model(4, 4), {}) is None
