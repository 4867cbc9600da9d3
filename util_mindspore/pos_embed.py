# --------------------------------------------------------
# RETFound for MindSpore: position-embedding helpers.
# Derived from: rmaphoh/RETFound util/pos_embed.py (itself from facebookresearch/mae,
# MoCo v3 and DeiT) -- same function names and semantics, written anew in numpy so
# that neither torch nor a MindSpore kernel is needed.
#
# interpolate_pos_embed resamples with a numpy port of
# torch.nn.functional.interpolate(mode='bicubic', align_corners=False) (checked against
# torch in tests/test_pos_embed.py). MindSpore's bicubic resize is not used: it differs
# from torch's by ~0.3 on these grids.
# --------------------------------------------------------
import numpy as np

__all__ = ['get_2d_sincos_pos_embed', 'get_2d_sincos_pos_embed_from_grid',
           'get_1d_sincos_pos_embed_from_grid', 'bicubic_resize_torch', 'interpolate_pos_embed']


# --------------------------------------------------------
# 2D sine-cosine position embedding
# --------------------------------------------------------
def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """(grid_size*grid_size, embed_dim), or (1 + grid_size*grid_size, embed_dim) with a zero
    row first when cls_token is True."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w goes first, as in the original
    grid = grid.reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0
    # half of the dimensions encode grid[0], the other half grid[1]
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """pos: positions of any shape (flattened to M); returns (M, embed_dim) = [sin | cos]."""
    assert embed_dim % 2 == 0
    # The original writes dtype=np.float (removed in numpy 1.24); it meant float64.
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.
    omega = 1. / 10000 ** omega  # (D/2,)
    pos = np.asarray(pos).reshape(-1)  # (M,)
    out = np.einsum('m,d->md', pos, omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


# --------------------------------------------------------
# torch-compatible bicubic resampling
# --------------------------------------------------------
def _cubic_weights(t, a=-0.75):
    """Keys' cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (torch's A=-0.75)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(in_size, out_size):
    """(out_size, in_size) matrix M such that M @ x resamples x along one axis like torch's
    upsample_bicubic2d with align_corners=False and an explicit output size."""
    scale = in_size / out_size
    # area_pixel_compute_source_index: (dst + 0.5) * scale - 0.5, NOT clamped at 0 for cubic
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(src)
    w = _cubic_weights(src - base)  # (out, 4)
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    for k in range(4):
        # taps outside the input read the border pixel (torch's upsample_get_value_bounded)
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
        np.add.at(mat, (rows, idx), w[:, k])
    return mat


def bicubic_resize_torch(x, size):
    """numpy equivalent of torch.nn.functional.interpolate(x, size=size, mode='bicubic',
    align_corners=False) for x of shape (..., H, W). Computed in float64, returned in x's dtype."""
    x = np.asarray(x)
    out_h, out_w = (size, size) if np.isscalar(size) else size
    mh = _bicubic_matrix(x.shape[-2], out_h)
    mw = _bicubic_matrix(x.shape[-1], out_w)
    y = np.einsum('oh,...hw,pw->...op', mh, x.astype(np.float64), mw)
    return y.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)


# --------------------------------------------------------
# Interpolate position embeddings for a new image size (DeiT)
# --------------------------------------------------------
def interpolate_pos_embed(model, checkpoint_model):
    """Resample checkpoint_model['pos_embed'] (numpy, (1, extra + S*S, D)) in place to the
    model's grid. The class (and any other extra) tokens are kept unchanged.

    Returns (orig_size, new_size) when it interpolated, else None.
    """
    if 'pos_embed' not in checkpoint_model:
        return None
    pos_embed_checkpoint = np.asarray(checkpoint_model['pos_embed'])
    embedding_size = pos_embed_checkpoint.shape[-1]
    num_patches = model.patch_embed.num_patches
    num_extra_tokens = model.pos_embed.shape[-2] - num_patches
    # height (== width) of the checkpoint's and of the model's grid
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    new_size = int(num_patches ** 0.5)
    if orig_size == new_size:
        return None
    print("Position interpolate from %dx%d to %dx%d" % (orig_size, orig_size, new_size, new_size))
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).transpose(0, 3, 1, 2)
    pos_tokens = bicubic_resize_torch(pos_tokens, (new_size, new_size))
    pos_tokens = pos_tokens.transpose(0, 2, 3, 1).reshape(pos_tokens.shape[0], new_size * new_size,
                                                          embedding_size)
    checkpoint_model['pos_embed'] = np.concatenate([extra_tokens, pos_tokens], axis=1)
    return orig_size, new_size
