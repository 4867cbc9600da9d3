"""Model parity: our MindSpore ViT beside the original's timm 0.9.16 code path, same weights."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

import models_vit_mindspore as models
from tests.helpers import TINY, tiny_vit, load_numpy_state, ms_mode, avx512_cpu

MODES = [pytest.param(ms.PYNATIVE_MODE, id="pynative"), pytest.param(ms.GRAPH_MODE, id="graph")]
# The fused CPU kernels (util_mindspore/cpu_kernels.py, on by default on CPU) and MindSpore's own
# operators (the path on GPU/Ascend, for fp16, and without a C++ compiler) must both be the original.
KERNELS = [pytest.param(True, id="fused_kernels"), pytest.param(False, id="ms_ops")]
# A MindSpore build without libdnnl: the kernels are on, Linear/attention fall back to MatMul with
# the fused bias add, bias+GELU, q/k/v split and softmax.
NO_GEMM = pytest.param("no_gemm", id="fused_kernels_without_onednn_gemm")


@pytest.fixture
def kernels(request, monkeypatch):
    from util_mindspore import cpu_kernels
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1" if request.param else "0")
    if request.param:
        assert cpu_kernels.enabled(), cpu_kernels.status()
    if request.param == "no_gemm":
        cpu_kernels.library_path()
        monkeypatch.setitem(cpu_kernels._state, "gemm", 0)  # as if dnnl_sgemm were not found
        assert not cpu_kernels.linear_available()
        return True
    return request.param


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_parameter_names_are_torch_keys():
    m = models.RETFound_mae(img_size=224, num_classes=5, global_pool=True)
    names = [p.name for p in m.get_parameters()]
    assert len(names) == len(set(names))
    for key in ['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias',
                'blocks.0.norm1.weight', 'blocks.0.norm1.bias', 'blocks.23.attn.qkv.weight',
                'blocks.23.mlp.fc2.bias', 'fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']:
        assert key in names, key
    assert not any(n.startswith('norm.') for n in names)  # the original deletes self.norm
    shapes = {p.name: tuple(p.shape) for p in m.get_parameters()}
    assert shapes['pos_embed'] == (1, 197, 1024) and shapes['patch_embed.proj.weight'] == (1024, 3, 16, 16)
    cls = models.RETFound_mae(img_size=224, num_classes=5, global_pool=False)
    cls_names = {p.name for p in cls.get_parameters()}
    assert {'norm.weight', 'norm.bias'} <= cls_names and 'fc_norm.weight' not in cls_names


def test_defaults_spelled_out():
    m = tiny_vit(global_pool=True)
    ln = m.blocks[0].norm1.layer_norm
    assert abs(ln.epsilon - 1e-6) < 1e-12  # MindSpore's default would be 1e-7
    from math import erf
    xs = np.linspace(-4, 4, 81).astype(np.float32)
    gelu = m.blocks[0].mlp.act(ms.Tensor(xs)).asnumpy()
    exact = np.array([0.5 * v * (1 + erf(v / np.sqrt(2))) for v in xs.astype(np.float64)])
    assert np.max(np.abs(gelu - exact)) < 1e-6  # exact erf GELU like torch (tanh form is ~1e-3 off)
    assert tuple(m.head.weight.shape) == (3, 32)


def test_drop_rate_is_the_head_dropout_as_timm_0_9():
    """timm 0.9 VisionTransformer: drop_rate drops before the head only, pos_drop_rate after the
    position embedding."""
    m = tiny_vit(drop_rate=0.5)
    assert isinstance(m.pos_drop, nn.Identity) and isinstance(m.head_drop, nn.Dropout)
    m = tiny_vit(pos_drop_rate=0.25)
    assert isinstance(m.pos_drop, nn.Dropout) and isinstance(m.head_drop, nn.Identity)


@pytest.mark.torch
@pytest.mark.parametrize("kernels", KERNELS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("global_pool", [True, False], ids=["global_pool", "cls_token"])
def test_logits_match_original(mode, global_pool, kernels):
    import torch
    from tests.original_reference import retfound_vit, randomize_, state_dict_numpy
    tm = randomize_(retfound_vit(global_pool=global_pool, num_classes=3, **TINY), seed=1).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tm(x).numpy()
    with ms_mode(mode):
        m = load_numpy_state(tiny_vit(global_pool=global_pool), state_dict_numpy(tm))
        assert m.blocks[0].attn.fused == m.blocks[0].mlp.fused == m.blocks[0].norm1.fused == kernels
        assert (m.blocks[0].attn.qkv.linear is not None) == kernels  # the oneDNN Linear operator
        m.set_train(False)
        out = m(ms.Tensor(x.numpy())).asnumpy()
    assert _max_abs(out, ref) <= 1e-5


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("embed_dim", [32, 48], ids=["all_packable", "some_not_packable"])
def test_fp32_evaluation_with_weights_packed_in_place_matches_original(mode, embed_dim):
    """Evaluation (engine predict: cpu_kernels.frozen_weights(model)) reorders the fp32 Linear
    weights in their own storage into oneDNN's packed layout: the logits still equal the
    original's, the packed path really ran, and the weights come back bit for bit. embed_dim 48
    has shapes whose packed layout is padded: those stay plain on dnnl_sgemm beside packed ones."""
    import torch
    from util_mindspore import cpu_kernels
    from tests.original_reference import retfound_vit, randomize_, state_dict_numpy
    if not cpu_kernels.linear_available():
        pytest.skip(cpu_kernels.status())
    cfg = dict(TINY, embed_dim=embed_dim)
    tm = randomize_(retfound_vit(global_pool=True, num_classes=3, **cfg), seed=7).eval()
    xs = [torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)) for b in (3, 1)]
    with torch.no_grad():
        refs = [tm(x).numpy() for x in xs]
    with ms_mode(mode):
        m = load_numpy_state(tiny_vit(global_pool=True, **cfg), state_dict_numpy(tm))
        m.set_train(False)
        plain = [m(ms.Tensor(x.numpy())).asnumpy() for x in xs]
        before = {p.name: p.asnumpy().copy() for p in m.get_parameters()}
        with cpu_kernels.frozen_weights(m):
            s1 = cpu_kernels.in_place_stats()
            packed = [m(ms.Tensor(x.numpy())).asnumpy() for x in xs]
            s2 = cpu_kernels.in_place_stats()
            moved = sum(not np.array_equal(before[p.name], p.asnumpy()) for p in m.get_parameters())
        s3 = cpu_kernels.in_place_stats()
        after = [m(ms.Tensor(x.numpy())).asnumpy() for x in xs]
    candidates = len(cpu_kernels._in_place_weights(m))
    assert candidates == 9  # qkv, proj, fc1, fc2 of two blocks, and the head
    if avx512_cpu():  # elsewhere oneDNN may choose padded layouts: those weights stay plain
        assert (s1['weights'] == candidates) if embed_dim == 32 else (0 < s1['weights'] < candidates)
    assert moved == s1['weights']  # their storage really holds the packed layout in the block
    assert s2['calls'] - s1['calls'] == 2 * s1['weights']  # two forwards through the packed path
    for ours, ref in zip(packed, refs):
        assert _max_abs(ours, ref) <= 1e-5
    assert s3['weights'] == 0 and s3['calls'] == s2['calls']
    for p in m.get_parameters():
        assert np.array_equal(before[p.name], p.asnumpy()), p.name
    for a, b in zip(after, plain):
        assert np.array_equal(a, b)


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("img_size,patch_size", [(36, 8), (256, 14)], ids=["36_over_8", "256_over_14"])
def test_image_size_not_a_multiple_of_the_patch_size(mode, img_size, patch_size):
    """timm's stride-p convolution leaves out the last img_size % p rows and columns (e.g.
    vit_huge_patch14 at the default --input_size 256: an 18x18 grid); the reshape used to fail."""
    import torch
    from tests.original_reference import retfound_vit, randomize_, state_dict_numpy
    cfg = dict(TINY, img_size=img_size, patch_size=patch_size, depth=1)
    tm = randomize_(retfound_vit(global_pool=True, num_classes=3, **cfg), seed=4).eval()
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tm(x).numpy()
    with ms_mode(mode):
        m = load_numpy_state(tiny_vit(global_pool=True, **cfg), state_dict_numpy(tm))
        assert m.patch_embed.num_patches == tm.patch_embed.num_patches == (img_size // patch_size) ** 2
        m.set_train(False)
        out = m(ms.Tensor(x.numpy())).asnumpy()
    assert _max_abs(out, ref) <= 1e-5


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES)
def test_cpu_bf16_logits_track_torch_bf16_autocast(mode, monkeypatch):
    """--cpu_bf16 (bf16 GEMM inputs in the Linear layers and the attention core) beside the
    original under torch.autocast('cpu', torch.bfloat16): both only round GEMM inputs (torch also
    rounds the Linear outputs), so they agree to bf16 precision, and both are that far from fp32."""
    import torch
    from util_mindspore import cpu_kernels
    from tests.original_reference import retfound_vit, randomize_, state_dict_numpy
    if not cpu_kernels.linear_available(bf16=True):
        pytest.skip(cpu_kernels.status())
    tm = randomize_(retfound_vit(global_pool=True, num_classes=3, **TINY), seed=4).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref32 = tm(x).numpy()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            ref16 = tm(x).float().numpy()
    state = state_dict_numpy(tm)
    with ms_mode(mode):
        m32 = load_numpy_state(tiny_vit(global_pool=True), state)
        monkeypatch.setitem(cpu_kernels._state, 'bf16_matmul', True)  # what main's --cpu_bf16 sets
        m16 = load_numpy_state(tiny_vit(global_pool=True), state)
        assert m16.blocks[0].attn.qkv.bf16 and m16.blocks[0].attn.fused_attn is not None
        m32.set_train(False)
        m16.set_train(False)
        out32 = m32(ms.Tensor(x.numpy())).asnumpy()
        out16 = m16(ms.Tensor(x.numpy())).asnumpy()
        # evaluation (engine predict) holds frozen_weights(): the Linear layers pack their bf16
        # weights once and reuse them; the values are the same up to summation order
        before = cpu_kernels.weight_cache_stats()
        with cpu_kernels.frozen_weights():
            frozen = [m16(ms.Tensor(x.numpy())).asnumpy() for _ in range(2)]
            held = cpu_kernels.weight_cache_stats()
        after = cpu_kernels.weight_cache_stats()
    scale = float(np.max(np.abs(ref32)))
    assert _max_abs(out32, ref32) <= 1e-5
    assert 1e-4 * scale < _max_abs(out16, ref32) <= 1e-2 * scale  # really bf16, and only that far
    assert _max_abs(out16, ref16) <= 1e-2 * scale
    assert _max_abs(ref16, ref32) > 1e-4 * scale
    n_linear = 4 * TINY['depth'] + 2  # qkv, proj, fc1, fc2 per block; the patch embedding; the head
    assert held['calls'] - before['calls'] == 2 * n_linear
    assert held['weights'] >= n_linear and held['bytes'] > 0
    assert n_linear <= held['packs'] - before['packs'] <= n_linear + 1  # once each (the patch kernel is
    assert after['weights'] == 0 and after['bytes'] == 0                # computed: a new address maybe)
    for out in frozen:
        assert _max_abs(out, out16) <= 1e-3 * scale
        assert _max_abs(out, ref16) <= 1e-2 * scale


class _WeightedSum(nn.Cell):
    def __init__(self, net, w):
        super().__init__(auto_prefix=False)
        self.net, self.w = net, w

    def construct(self, x):
        return (self.net(x) * self.w).sum()


@pytest.mark.torch
def test_cpu_bf16_saved_bf16_inputs_leave_the_gradients_unchanged(monkeypatch):
    """A GRAPH-mode build hands the bf16-rounded GEMM inputs to the backward (Linear: (y, xb), the
    attention core: (out, qkvb)), a PyNative build rounds the fp32 inputs again in the backward:
    the same values, so every parameter gradient is bit-identical."""
    import torch
    from util_mindspore import cpu_kernels
    from tests.original_reference import retfound_vit, randomize_, state_dict_numpy
    if not cpu_kernels.linear_available(bf16=True):
        pytest.skip(cpu_kernels.status())
    state = state_dict_numpy(randomize_(retfound_vit(global_pool=True, num_classes=3, **TINY), seed=5))
    monkeypatch.setitem(cpu_kernels._state, 'bf16_matmul', True)
    with ms_mode(ms.PYNATIVE_MODE):
        plain = load_numpy_state(tiny_vit(global_pool=True), state)
    with ms_mode(ms.GRAPH_MODE):
        paired = load_numpy_state(tiny_vit(global_pool=True), state)
        assert paired.blocks[0].attn.qkv.bf16_pair and paired.blocks[0].attn.bf16_pair
        assert not plain.blocks[0].attn.qkv.bf16_pair and not plain.blocks[0].attn.bf16_pair
        x = ms.Tensor(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6)).numpy())
        w = ms.Tensor(np.random.RandomState(7).standard_normal((3, 3)).astype(np.float32))
        grads = []
        for net in (plain, paired):
            net.set_train(True)
            fn = ms.value_and_grad(_WeightedSum(net, w), None, net.trainable_params())
            _, g = fn(x)
            grads.append([a.asnumpy() for a in g])
    assert len(grads[0]) == len(grads[1]) > 10
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)
    assert max(np.abs(a).max() for a in grads[0]) > 0


@pytest.mark.torch
def test_fc_norm_is_applied_twice_like_original_and_single_is_optional():
    """PARITY: under timm 0.9 the original applies fc_norm twice; our default does too."""
    import torch
    from tests.original_reference import retfound_vit, randomize_, state_dict_numpy
    tm = randomize_(retfound_vit(global_pool=True, num_classes=3, **TINY), seed=2).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        double = tm(x).numpy()
        single = tm.forward_single_norm(x).numpy()
    assert _max_abs(double, single) > 1e-2  # the quirk is real and visible in the logits
    state = state_dict_numpy(tm)
    m2 = load_numpy_state(tiny_vit(global_pool=True), state)
    m1 = load_numpy_state(tiny_vit(global_pool=True, fc_norm_twice=False), state)
    m1.set_train(False)
    m2.set_train(False)
    xm = ms.Tensor(x.numpy())
    assert _max_abs(m2(xm).asnumpy(), double) <= 1e-5
    assert _max_abs(m1(xm).asnumpy(), single) <= 1e-5


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("swiglu", [False, True], ids=["dinov2_mlp", "dinov2_swiglu"])
def test_dinov2_architecture_matches_timm(mode, swiglu):
    import torch
    from tests.original_reference import timm_dinov2, randomize_, state_dict_numpy
    tm = randomize_(timm_dinov2(swiglu=swiglu, img_size=28, embed_dim=32, depth=2, num_heads=4,
                                num_classes=4), seed=3).eval()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tm(x).numpy()
    cfg = dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=4, num_classes=4,
               init_values=1e-5, global_pool=False)
    if swiglu:
        cfg.update(mlp_ratio=2.66667 * 2, mlp_layer='swiglu_packed')
    with ms_mode(mode):
        m = load_numpy_state(models.VisionTransformer(**cfg), state_dict_numpy(tm))
        m.set_train(False)
        out = m(ms.Tensor(x.numpy())).asnumpy()
    assert _max_abs(out, ref) <= 1e-5


@pytest.mark.torch
def test_full_size_key_sets_and_shapes_equal_original():
    """Every factory has exactly the original's state-dict keys and shapes."""
    import timm
    from tests.original_reference import retfound_vit
    if True:  # timm's constructor calls .item(): the meta device cannot be used
        ref = {
            'RETFound_mae': retfound_vit(global_pool=True, img_size=224, patch_size=16, embed_dim=1024,
                                         depth=24, num_heads=16, num_classes=5),
            'RETFound_dinov2': timm.create_model('vit_large_patch14_dinov2', pretrained=False, img_size=224,
                                                 num_classes=5),
            # ViT-g at full depth is 1.1B parameters: compare a depth-2 cut of the same configuration
            'dinov2_vitg14': timm.create_model('vit_giant_patch14_dinov2', pretrained=False, img_size=224,
                                               num_classes=5, depth=2),
        }
    ours = {
        'RETFound_mae': lambda: models.RETFound_mae(img_size=224, num_classes=5, global_pool=True),
        'RETFound_dinov2': lambda: models.RETFound_dinov2(num_classes=5),
        'dinov2_vitg14': lambda: models.Dinov2(model_arch='dinov2_vitg14', num_classes=5, depth=2),
    }
    for name in list(ref):
        tshapes = {k: tuple(v.shape) for k, v in ref.pop(name).state_dict().items()}
        m = ours[name]()
        mshapes = {p.name: tuple(p.shape) for p in m.get_parameters()}
        assert mshapes == tshapes, name
        del m


@pytest.mark.torch
@pytest.mark.parametrize("kernels", KERNELS + [NO_GEMM], indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_original(mode, kernels):
    import torch
    from tests.original_reference import retfound_vit, randomize_, state_dict_numpy
    tm = randomize_(retfound_vit(global_pool=True, num_classes=3, **TINY), seed=4).train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 2, 1, 2])
    loss = torch.nn.functional.cross_entropy(tm(x), y)
    loss.backward()
    tgrads = {n: p.grad.numpy() for n, p in tm.named_parameters()}

    with ms_mode(mode):
        m = load_numpy_state(tiny_vit(global_pool=True), state_dict_numpy(tm))
        assert m.blocks[0].attn.fused == kernels
        m.set_train(True)  # drop path 0: train mode must equal eval arithmetic here
        params = m.trainable_params()

        class Loss(nn.Cell):
            def __init__(self):
                super().__init__(auto_prefix=False)  # keep the torch parameter names
                self.m = m
                self.ce = nn.CrossEntropyLoss()

            def construct(self, xx, yy):
                return self.ce(self.m(xx), yy)

        grad_fn = ms.value_and_grad(Loss(), None, params)
        mloss, grads = grad_fn(ms.Tensor(x.numpy()), ms.Tensor(y.numpy().astype(np.int32)))
    assert abs(float(mloss.asnumpy()) - float(loss.item())) <= 1e-5
    checked = 0
    for p, g in zip(params, grads):
        ref = tgrads[p.name]
        rel = np.linalg.norm(g.asnumpy() - ref) / max(np.linalg.norm(ref), 1e-12)
        assert rel <= 1e-5, (p.name, rel)
        checked += 1
    assert checked == len(tgrads)


@pytest.mark.parametrize("kernels", KERNELS, indirect=True)
def test_drop_path_is_per_sample_and_scaled(kernels):
    ms.set_seed(0)
    dp = models.DropPath(0.5)
    assert dp.fused == kernels
    dp.set_train(True)
    x = ms.Tensor(np.ones((4000, 2, 3), np.float32))
    y = dp(x).asnumpy()
    per_sample = y[:, 0, 0]
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(y == per_sample[:, None, None])  # whole sample kept or dropped
    assert abs(per_sample.mean() - 1.0) < 0.08  # expectation preserved
    # the Block's residual x + drop_path(y): the same per-sample rule, added to x
    base = np.arange(4000 * 6, dtype=np.float32).reshape(4000, 2, 3)
    r = dp.residual(ms.Tensor(base), x).asnumpy() - base
    assert set(np.unique(r[:, 0, 0])) <= {0.0, 2.0} and np.all(r == r[:, :1, :1])
    assert abs(r[:, 0, 0].mean() - 1.0) < 0.08
    dp.set_train(False)
    assert np.array_equal(dp(x).asnumpy(), np.ones((4000, 2, 3), np.float32))
    assert np.array_equal(dp.residual(ms.Tensor(base), x).asnumpy(), base + 1)


def test_drop_path_keep_probability():
    """mask = (N(0,1) < Phi^-1(keep)) is Bernoulli(keep): the kept fraction over many samples."""
    from scipy import stats
    ms.set_seed(1)
    dp = models.DropPath(0.2)
    dp.set_train(True)
    kept = int((dp(ms.Tensor(np.ones((20000, 1), np.float32))).asnumpy() > 0).sum())
    assert stats.binomtest(kept, 20000, 0.8).pvalue > 1e-3, kept


_SEEDED = """
import sys, numpy as np, mindspore as ms
sys.path.insert(0, {root!r})
ms.set_context(mode=ms.GRAPH_MODE)
import models_vit_mindspore as models
ms.set_seed(int(sys.argv[1]))
m = models.vit_tiny_patch16(img_size=32, num_classes=3, drop_path_rate=0.5)
m.set_train(True)
x = ms.Tensor(np.ones((6, 3, 32, 32), np.float32))
np.save(sys.argv[2], np.stack([m(x).asnumpy() for _ in range(2)]))
"""


def test_drop_path_follows_the_seed(tmp_path):
    """--seed makes training reproducible, as torch.manual_seed does for the original's drop path:
    the same seed gives the same masks in another process, a new call new masks. (ops.bernoulli
    drew a fresh random seed in every process.)"""
    import subprocess
    import sys
    from tests.helpers import ROOT
    script = tmp_path / 'seeded.py'
    script.write_text(_SEEDED.format(root=ROOT))
    outs = []
    for seed, name in ((3, 'a'), (3, 'b'), (4, 'c')):
        subprocess.run([sys.executable, str(script), str(seed), str(tmp_path / name)], check=True,
                       capture_output=True, timeout=300)
        outs.append(np.load(tmp_path / f'{name}.npy'))
    a, b, c = outs
    assert np.array_equal(a, b)                       # same seed, same masks
    assert not np.array_equal(a[0], a[1])             # a new call draws new masks
    assert not np.array_equal(a, c)                   # another seed, other masks


def test_dinov2_factories_fix_224_and_token_pooling():
    m = models.Dinov2(model_arch='dinov2_vits14', num_classes=2, global_pool=True, img_size=256)
    assert m.patch_embed.img_size == (224, 224) and m.patch_embed.num_patches == 256
    assert not m.global_pool and hasattr(m, 'norm')
    with pytest.raises(ValueError, match="Unknown model_arch 'dinov3_vits16'"):
        models.Dinov2(model_arch='dinov3_vits16', num_classes=2)


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("global_pool", [True, False])
def test_full_vit_large_logits_match_original(global_pool):
    import torch
    from tests.original_reference import retfound_vit, randomize_, state_dict_numpy
    tm = randomize_(retfound_vit(global_pool=global_pool, img_size=224, patch_size=16, embed_dim=1024,
                                 depth=24, num_heads=16, num_classes=5), seed=5).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = tm(x).numpy()
    state = state_dict_numpy(tm)
    del tm
    m = load_numpy_state(models.RETFound_mae(img_size=224, num_classes=5, global_pool=global_pool), state)
    m.set_train(False)
    out = m(ms.Tensor(x.numpy())).asnumpy()
    assert _max_abs(out, ref) <= 1e-5


def test_exact_gelu_paths_agree():
    """The fused CPU kernel, the erf composition (CPU fallback) and MindSpore's GELU kernel
    (GPU/Ascend) are all torch's exact GELU."""
    from math import erf
    from util_mindspore import cpu_kernels
    xs = np.linspace(-6, 6, 241).astype(np.float32)
    exact = np.array([0.5 * v * (1 + erf(v / np.sqrt(2))) for v in xs.astype(np.float64)])
    paths = [(True, False), (False, False)] + ([(True, True)] if cpu_kernels.enabled() else [])
    for composed, fused in paths:
        got = models.ExactGELU(composed=composed, fused=fused)(ms.Tensor(xs)).asnumpy()
        assert np.max(np.abs(got - exact)) < 1e-6, (composed, fused)
