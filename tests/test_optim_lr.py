"""Layer-decay groups, the cosine schedule and AdamW against hand-computed values and the original."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from util_mindspore.lr_decay import param_groups_lrd, get_layer_id_for_vit
from util_mindspore.lr_sched import adjust_learning_rate, lr_at
from util_mindspore import cpu_kernels as K
from util_mindspore.optim import AdamW, clip_grad_norm
from tests.helpers import tiny_vit, load_numpy_state, ms_mode


def test_layer_ids_hand_computed():
    assert get_layer_id_for_vit('cls_token', 25) == 0
    assert get_layer_id_for_vit('pos_embed', 25) == 0
    assert get_layer_id_for_vit('patch_embed.proj.weight', 25) == 0
    assert get_layer_id_for_vit('blocks.0.attn.qkv.weight', 25) == 1
    assert get_layer_id_for_vit('blocks.23.mlp.fc2.bias', 25) == 24
    assert get_layer_id_for_vit('fc_norm.weight', 25) == 25
    assert get_layer_id_for_vit('head.bias', 25) == 25


def test_param_groups_hand_computed():
    m = tiny_vit(depth=2, global_pool=True)  # num_layers = 3
    groups = param_groups_lrd(m, weight_decay=0.05, no_weight_decay_list=m.no_weight_decay(), layer_decay=0.5)
    by_name = {}
    for g in groups:
        for n in g['param_names']:
            by_name[n] = (g['lr_scale'], g['weight_decay'])
    assert by_name['cls_token'] == (0.5 ** 3, 0.0)
    assert by_name['pos_embed'] == (0.5 ** 3, 0.0)         # 3-D but in no_weight_decay()
    assert by_name['patch_embed.proj.weight'] == (0.5 ** 3, 0.05)
    assert by_name['patch_embed.proj.bias'] == (0.5 ** 3, 0.0)
    assert by_name['blocks.0.attn.qkv.weight'] == (0.5 ** 2, 0.05)
    assert by_name['blocks.1.norm1.weight'] == (0.5 ** 1, 0.0)
    assert by_name['head.weight'] == (1.0, 0.05)
    assert by_name['fc_norm.bias'] == (1.0, 0.0)
    assert len(by_name) == len(list(m.get_parameters()))


def test_frozen_parameters_are_left_out():
    m = tiny_vit(depth=2, global_pool=True)
    for p in m.get_parameters():
        p.requires_grad = p.name.startswith('head')
    groups = param_groups_lrd(m, 0.05, m.no_weight_decay(), 0.65)
    names = sorted(n for g in groups for n in g['param_names'])
    assert names == ['head.bias', 'head.weight']


def _args(**kw):
    a = dict(lr=1e-3, min_lr=1e-6, warmup_epochs=2, epochs=10)
    a.update(kw)
    return SimpleNamespace(**a)


def test_schedule_hand_computed():
    args = _args()
    assert lr_at(0, args) == 0.0
    assert lr_at(1, args) == pytest.approx(5e-4, rel=1e-12)           # linear warmup
    assert lr_at(2, args) == pytest.approx(1e-3, rel=1e-12)           # cosine start
    assert lr_at(6, args) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5, rel=1e-12)  # half-way
    assert lr_at(10, args) == pytest.approx(1e-6, rel=1e-12)
    # fractional epoch, as train_one_epoch passes data_iter_step / len(loader) + epoch
    assert lr_at(3.25, args) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 1.25 / 8)))


@pytest.mark.torch
def test_groups_and_effective_lr_equal_original():
    import torch
    from tests.original_reference import (retfound_vit, lr_decay_param_groups, adjust_learning_rate as
                                          adjust_ref, state_dict_numpy)
    tm = retfound_vit(global_pool=True, num_classes=3, img_size=32, patch_size=8, embed_dim=32, depth=2,
                      num_heads=4)
    tgroups = lr_decay_param_groups(tm, 0.05, tm.no_weight_decay(), 0.65)
    topt = torch.optim.AdamW(tgroups, lr=1e-3)
    m = load_numpy_state(tiny_vit(global_pool=True), state_dict_numpy(tm))
    groups = param_groups_lrd(m, 0.05, m.no_weight_decay(), 0.65)
    assert [(g['lr_scale'], g['weight_decay'], g['param_names']) for g in groups] == \
        [(g['lr_scale'], g['weight_decay'], g['names']) for g in tgroups]
    opt = AdamW(groups, lr=1e-3)
    args = _args(lr=1e-3, warmup_epochs=1, epochs=4)
    for epoch in [0.0, 0.5, 1.0, 2.25, 3.9]:
        ref = adjust_ref(topt, epoch, args)
        ours = adjust_learning_rate(opt, epoch, args)
        assert ours == ref
        ref_lrs = [g['lr'] for g in topt.param_groups for _ in g['params']]
        assert np.allclose(opt.group_lrs(), ref_lrs, rtol=1e-15, atol=0)


@pytest.mark.torch
@pytest.mark.parametrize("fused", [True, "ms", False], ids=["fused", "ms_kernel", "composed"])
@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_three_adamw_steps_equal_torch(mode, fused):
    import torch
    from tests.original_reference import retfound_vit, lr_decay_param_groups, randomize_, state_dict_numpy
    tm = randomize_(retfound_vit(global_pool=True, num_classes=3, img_size=32, patch_size=8, embed_dim=32,
                                 depth=2, num_heads=4), seed=7)
    tgroups = lr_decay_param_groups(tm, 0.05, tm.no_weight_decay(), 0.65)
    topt = torch.optim.AdamW(tgroups, lr=1e-3)
    with ms_mode(mode):
        m = load_numpy_state(tiny_vit(global_pool=True), state_dict_numpy(tm))
        opt = AdamW(param_groups_lrd(m, 0.05, m.no_weight_decay(), 0.65), lr=1e-3, fused=fused)
        rng = np.random.default_rng(0)
        for step, lr in enumerate([1e-3, 5e-4, 2e-3]):
            grads = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in tm.named_parameters()}
            for g in topt.param_groups:
                g['lr'] = lr * g['lr_scale']
            for n, p in tm.named_parameters():
                p.grad = torch.from_numpy(grads[n])
            topt.step()
            opt.set_lr(lr)
            opt(tuple(Tensor(grads[p.name]) for p in opt.parameters), Tensor(lr, ms.float32))
        ref = state_dict_numpy(tm)
        worst = max(float(np.max(np.abs(p.asnumpy() - ref[p.name]))) for p in opt.parameters)
        used = 'inplace' if opt.inplace is not None else ('ms' if opt.fused else 'composed')
    assert worst <= 1e-6, worst
    # on CPU with the kernel library, fused=True is the library's in-place kernel
    assert used == {True: 'inplace' if K.enabled() else 'ms', 'ms': 'ms', False: 'composed'}[fused]


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_inplace_adamw_kernel_is_the_composed_update_bit_for_bit(mode):
    """The library's in-place step does the composed update's float32 operations in its order."""
    if not K.enabled():
        pytest.skip(K.status())
    with ms_mode(mode):
        finals = {}
        for fused in (True, False):
            np.random.seed(0)
            m = tiny_vit(global_pool=True)
            opt = AdamW(param_groups_lrd(m, 0.05, m.no_weight_decay(), 0.65), lr=1e-3, fused=fused)
            assert (opt.inplace is not None) == fused
            steps = np.random.default_rng(3)
            for lr in (1e-3, 5e-4, 2e-3, 1e-2):
                grads = tuple(Tensor((steps.standard_normal(p.shape) * 10.0 ** steps.integers(-6, 1)).astype(np.float32))
                              for p in opt.parameters)
                opt(grads, Tensor(lr, ms.float32))
            finals[fused] = [(p.asnumpy(), a.asnumpy(), v.asnumpy())
                             for p, a, v in zip(opt.parameters, opt.exp_avg, opt.exp_avg_sq)]
    for got, ref in zip(finals[True], finals[False]):
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)


def test_clip_grad_norm_hand_computed():
    g = (Tensor(np.array([3.0, 0.0], np.float32)), Tensor(np.array([[4.0]], np.float32)))
    clipped, total = clip_grad_norm(g, 1.0)
    assert float(total.asnumpy()) == pytest.approx(5.0)
    assert np.allclose(clipped[0].asnumpy(), [3.0 / (5.0 + 1e-6), 0.0], rtol=1e-6)
    assert np.allclose(clipped[1].asnumpy(), [[4.0 / (5.0 + 1e-6)]], rtol=1e-6)
    same, _ = clip_grad_norm(g, 10.0)  # below the threshold: unchanged (coefficient clamped to 1)
    assert np.array_equal(same[0].asnumpy(), g[0].asnumpy())
