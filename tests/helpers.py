"""Small helpers shared by tests (no torch here)."""
import contextlib
import os

import numpy as np
import mindspore as ms

import models_vit_mindspore as models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)


def tiny_vit(**kwargs):
    cfg = dict(TINY, mlp_ratio=4, qkv_bias=True, norm_eps=1e-6, num_classes=3)
    cfg.update(kwargs)
    return models.VisionTransformer(**cfg)


def load_numpy_state(cell, state):
    """Copy a {name: ndarray} dict into a cell; every parameter must be present with its shape."""
    params = {p.name: p for p in cell.get_parameters()}
    missing = sorted(set(params) - set(state))
    assert not missing, f"missing in state: {missing}"
    for name, p in params.items():
        value = np.asarray(state[name], dtype=np.float32)
        assert tuple(p.shape) == value.shape, (name, p.shape, value.shape)
        p.set_data(ms.Tensor(value))
    return cell


@contextlib.contextmanager
def ms_mode(mode):
    old = ms.get_context("mode")
    ms.set_context(mode=mode)
    try:
        yield
    finally:
        ms.set_context(mode=old)


def avx512_cpu():
    """On AVX-512 CPUs oneDNN chooses, for every Linear shape of the tiny test models, a blocked
    layout of the plain size (brgemm): there fp32 evaluation must really pack weights in place."""
    from util_mindspore import cpu_kernels
    return 'avx512f' in cpu_kernels._cpu_signature().split('|', 1)[-1].split()
