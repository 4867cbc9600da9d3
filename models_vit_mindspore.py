# --------------------------------------------------------
# RETFound for MindSpore: the Vision Transformer and its model factories.
# Derived from: rmaphoh/RETFound models_vit.py (a subclass of timm 0.9.x
# VisionTransformer) and timm 0.9.16 vision_transformer.py (Block, Attention,
# Mlp, LayerScale, the DINOv2 configurations). Written anew for MindSpore.
#
# Parameter names equal the PyTorch state-dict keys (``blocks.3.attn.qkv.weight``,
# ``blocks.3.norm1.weight``, ``patch_embed.proj.weight``): the LayerNorm below keeps
# torch's ``weight``/``bias`` names, so converting a checkpoint is a plain key copy.
# Every MindSpore default that differs from torch is spelled out at the call site.
# --------------------------------------------------------
import math
import statistics

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import initializer, Uniform, Zero, One

from util_mindspore import cpu_kernels

__all__ = [
    'VisionTransformer', 'RETFound_mae', 'RETFound_dinov2', 'Dinov2',
    'vit_base_patch16', 'vit_large_patch16', 'vit_huge_patch14', 'vit_tiny_patch16', 'vit_small_patch16',
    'MODEL_NAMES',
]


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with torch's parameter names (weight, bias).

    mindspore.nn.LayerNorm names its parameters gamma/beta and defaults to eps=1e-7;
    RETFound uses eps=1e-6 (partial(nn.LayerNorm, eps=1e-6) in the original).

    On CPU (fp32) the fused kernel of util_mindspore/cpu_kernels.py runs instead of MindSpore's
    LayerNorm/LayerNormGrad: the same function (two-pass mean and biased variance), ~15x faster
    backward.
    """

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = Parameter(initializer(One(), (dim,), ms.float32), name='weight')
        self.bias = Parameter(initializer(Zero(), (dim,), ms.float32), name='bias')
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.fused = cpu_kernels.enabled()
        self.fused_ln = cpu_kernels.layer_norm_op() if self.fused else None
        self.eps = cpu_kernels.scalar(eps)

    def construct(self, x):
        if self.fused and x.dtype == ms.float32:
            return self.fused_ln(x, self.weight, self.bias, self.eps)[0]
        y, _, _ = self.layer_norm(x, self.weight, self.bias)
        return y


def trunc_normal(shape, std=0.02, a=-2.0, b=2.0):
    """timm trunc_normal_(std, a=-2, b=2): N(0, std) truncated at *absolute* bounds a, b.

    Drawn with numpy (np.random global state, seeded by main): MindSpore's TruncatedNormal
    initializer takes ~20 s for ViT-L on 2 cores, this takes ~1 s.
    """
    out = (np.random.standard_normal(shape) * std).astype(np.float32)
    bad = (out < a) | (out > b)
    while bad.any():  # rejection sampling: the same distribution as the inverse-CDF method
        out[bad] = (np.random.standard_normal(int(bad.sum())) * std).astype(np.float32)
        bad = (out < a) | (out > b)
    return Tensor(out)


class Dense(nn.Cell):
    """torch.nn.Linear: y = x @ weight.T + bias over the last axis; parameters weight (out, in), bias (out).

    The names and shapes of mindspore.nn.Dense, which it replaces so that on CPU (fp32) the layer
    runs as one fused operator (util_mindspore/cpu_kernels.py linear_op: oneDNN GEMM with the bias,
    one backward kernel for dx, dW and db; in bf16 GEMM inputs when cpu_kernels.set_bf16_matmul
    was called before building). Without the GEMM, only the bias add and its gradient are fused
    (MindSpore's BiasAddGrad costs ~8 ms per ViT-B layer at batch 8). Elsewhere: MatMul + BiasAdd.
    """

    def __init__(self, in_features, out_features, has_bias=True):
        super().__init__()
        self.in_channels = in_features
        self.out_channels = out_features
        self.has_bias = bool(has_bias)
        # timm init_weights_vit_timm: trunc_normal_(std=.02) on Linear weights, zeros on biases.
        self.weight = Parameter(trunc_normal((out_features, in_features)), name='weight')
        self.bias = Parameter(initializer(Zero(), (out_features,), ms.float32), name='bias') if has_bias else None
        self.matmul = ops.MatMul(transpose_a=False, transpose_b=True)
        self.bias_add = ops.BiasAdd(data_format='NCHW')  # on 2-D input: adds bias along axis 1
        self.fused = cpu_kernels.enabled() and self.has_bias
        self.bf16 = self.fused and cpu_kernels.bf16_matmul()
        use_gemm = self.fused and cpu_kernels.linear_available(self.bf16)
        # GRAPH + bf16: the op also returns x in bf16 for its backward (see linear_op)
        self.bf16_pair = self.bf16 and cpu_kernels.save_bf16_inputs()
        self.linear = cpu_kernels.linear_op(bf16=self.bf16, save_bf16=self.bf16_pair) if use_gemm else None
        # without oneDNN's GEMM: MatMul, then the fused bias add
        self.fused_bias_add = cpu_kernels.bias_add_op() if self.fused and not use_gemm else None
        # fp32 through oneDNN: evaluation may pack the weight in place (cpu_kernels.frozen_weights(model))
        self.packs_in_place = use_gemm and not self.bf16

    def matmul_2d(self, x):
        """x @ weight.T for x of any rank, flattened to (rows, in); returns (rows, out)."""
        return self.matmul(x.reshape(-1, self.in_channels), self.weight)

    def add_bias(self, y):
        if self.fused_bias_add is not None and y.dtype == ms.float32:
            return self.fused_bias_add(y, self.bias)
        return self.bias_add(y, self.bias)

    def construct(self, x):
        if self.linear is not None and x.dtype == ms.float32:
            if self.bf16_pair:
                return self.linear(x, self.weight, self.bias)[0]  # (y, x in bf16 for the backward)
            return self.linear(x, self.weight, self.bias)
        out_shape = x.shape[:-1] + (self.out_channels,)
        y = self.matmul_2d(x)
        if self.has_bias:
            y = self.add_bias(y)
        return y.reshape(out_shape)


def _dense(in_features, out_features, has_bias=True):
    return Dense(in_features, out_features, has_bias=has_bias)


class PatchProj(nn.Cell):
    """The stride-p, kernel-p convolution of timm's PatchEmbed, as one matmul.

    Holds torch's Conv2d parameters unchanged (weight (D, C, p, p), bias (D,)).
    nn.Conv2d on CPU is ~60x slower for this shape (STYLE.md), and the patch
    reshape + matmul is the same arithmetic.
    """

    def __init__(self, in_chans, embed_dim, patch_size):
        super().__init__()
        fan_in = in_chans * patch_size * patch_size
        bound = 1.0 / math.sqrt(fan_in)  # torch Conv2d default init: U(-1/sqrt(fan_in), +)
        self.weight = Parameter(initializer(Uniform(scale=bound), (embed_dim, in_chans, patch_size, patch_size),
                                            ms.float32), name='weight')
        self.bias = Parameter(initializer(Uniform(scale=bound), (embed_dim,), ms.float32), name='bias')
        self.embed_dim = embed_dim
        self.fan_in = fan_in
        self.matmul = ops.MatMul(transpose_a=False, transpose_b=True)
        self.fused = cpu_kernels.enabled()
        bf16 = self.fused and cpu_kernels.bf16_matmul()
        use_gemm = self.fused and cpu_kernels.linear_available(bf16)
        self.bf16_pair = bf16 and cpu_kernels.save_bf16_inputs()  # as Dense
        self.linear = cpu_kernels.linear_op(bf16=bf16, save_bf16=self.bf16_pair) if use_gemm else None
        self.fused_bias_add = cpu_kernels.bias_add_op() if self.fused and not use_gemm else None

    def construct(self, patches):
        # patches: (B, N, C*p*p) in (C, p, p) order, like the flattened conv kernel
        b, n, _ = patches.shape
        w = self.weight.reshape(self.embed_dim, self.fan_in)
        if self.linear is not None and patches.dtype == ms.float32:
            if self.bf16_pair:
                return self.linear(patches, w, self.bias)[0]
            return self.linear(patches, w, self.bias)
        y = self.matmul(patches.reshape(b * n, self.fan_in), w)
        if self.fused_bias_add is not None and y.dtype == ms.float32:
            y = self.fused_bias_add(y, self.bias)
        else:
            y = y + self.bias
        return y.reshape(b, n, self.embed_dim)


class PatchEmbed(nn.Cell):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = PatchProj(in_chans, embed_dim, patch_size)
        # timm's stride-p, kernel-p Conv2d (no padding) leaves out the last img_size % p rows and
        # columns (vit_huge_patch14 at 256: an 18x18 grid over 252x252 pixels); so does this.
        self.crop = img_size % patch_size != 0

    def construct(self, x):
        b = x.shape[0]
        p = self.patch_size[0]
        gh, gw = self.grid_size
        # The image must be exactly img_size, as timm's strict_img_size=True asserts.
        if self.crop:
            x = x[:, :, :gh * p, :gw * p]
        x = x.reshape(b, self.in_chans, gh, p, gw, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, self.in_chans * p * p)
        return self.proj(x)  # (B, N, D), as timm's flatten(2).transpose(1, 2)


class Attention(nn.Cell):
    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.):
        super().__init__()
        assert dim % num_heads == 0, 'dim should be divisible by num_heads'
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = _dense(dim, dim * 3, has_bias=qkv_bias)
        self.attn_drop = nn.Dropout(p=attn_drop) if attn_drop > 0 else nn.Identity()
        self.proj = _dense(dim, dim)
        self.proj_drop = nn.Dropout(p=proj_drop) if proj_drop > 0 else nn.Identity()
        self.softmax = nn.Softmax(axis=-1)
        self.q_matmul_k = ops.BatchMatMul(transpose_a=False, transpose_b=True)
        self.attn_matmul_v = ops.BatchMatMul(transpose_a=False, transpose_b=False)
        # CPU fp32: one kernel splits q/k/v into heads (and scales q) instead of a transpose copy
        # and three StridedSlices (~17 ms each at ViT-B batch 8); softmax with a fused backward.
        self.fused = cpu_kernels.enabled()
        self.scale_t = cpu_kernels.scalar(self.scale)
        # With oneDNN's GEMM: the whole core (split, q k^T, softmax, p v, head merge) in one
        # operator that keeps nothing but qkv for its backward (which recomputes softmax(p) per
        # head, as torch's CPU flash attention does); its GEMMs take bf16 inputs in the
        # --cpu_bf16 mode, like the Linear layers (torch's bf16 autocast runs timm's
        # scaled_dot_product_attention in bf16 too). Otherwise the split and the softmax alone are fused.
        bf16 = self.fused and cpu_kernels.bf16_matmul()
        use_core = self.fused and attn_drop == 0 and cpu_kernels.linear_available(bf16)
        self.bf16_pair = bf16 and cpu_kernels.save_bf16_inputs()  # (out, qkv in bf16), as Dense
        self.fused_attn = (cpu_kernels.attention_recompute_op(num_heads, bf16=bf16, save_bf16=self.bf16_pair)
                           if use_core else None)
        self.heads_t = cpu_kernels.scalar(float(num_heads))
        use_parts = self.fused and not use_core
        self.qkv_split = cpu_kernels.qkv_split_op(num_heads) if use_parts else None
        self.fused_softmax = cpu_kernels.softmax_op() if use_parts else None

    def construct(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x)
        if self.fused_attn is not None and qkv.dtype == ms.float32:
            x = self.fused_attn(qkv, self.scale_t, self.heads_t)
            if self.bf16_pair:
                x = x[0]  # (out, qkv in bf16 for the backward)
            return self.proj_drop(self.proj(x))
        if self.qkv_split is not None and qkv.dtype == ms.float32:
            q, k, v = self.qkv_split(qkv, self.scale_t)  # q already multiplied by scale
            attn = self.q_matmul_k(q, k)
            attn = self.attn_drop(self.fused_softmax(attn))
        else:
            qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = self.q_matmul_k(q * self.scale, k)
            attn = self.attn_drop(self.softmax(attn))
        x = self.attn_matmul_v(attn, v)
        x = x.transpose(0, 2, 1, 3).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class LayerScale(nn.Cell):
    """timm LayerScale (DINOv2): x * gamma, gamma initialised to init_values."""

    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = Parameter(Tensor(np.full((dim,), init_values, dtype=np.float32)), name='gamma')

    def construct(self, x):
        return x * self.gamma


class DropPath(nn.Cell):
    """Stochastic depth per sample (timm drop_path with scale_by_keep=True)."""

    def __init__(self, drop_prob=0.):
        super().__init__()
        self.keep_prob = 1.0 - drop_prob
        # a standard normal draw below this is a Bernoulli(keep_prob) draw (see sample_scale)
        self.z_keep = statistics.NormalDist().inv_cdf(self.keep_prob) if 0.0 < self.keep_prob < 1.0 else None
        # CPU fp32: x * s[b] and the residual x + y * s[b] as single operators (section 0 of
        # docs/performance.md: the broadcast Mul and its gradient cost ~35 MB per call at ViT-B b8)
        self.fused = cpu_kernels.enabled()
        self.row_scale = cpu_kernels.row_scale_op() if self.fused else None
        self.add_row_scale = cpu_kernels.add_row_scale_op() if self.fused else None

    def sample_scale(self, x):
        """Per-sample factor mask / keep_prob, shape (B,), fp32."""
        # timm: bernoulli_(keep_prob), from torch's generator that torch.manual_seed(seed) seeds.
        # Here mask = (N(0,1) draw < Phi^-1(keep_prob)), the same distribution, from ops.randn: of
        # MindSpore 2.10's random operators with CPU/GPU/Ascend kernels, it is the one that follows
        # ms.set_seed (so --seed makes runs reproducible) and is not deprecated. ops.bernoulli
        # without a seed draws a new random seed in every process; with one, the same mask on
        # every call. UniformReal (ops.rand, ops.uniform) is deprecated; mint.rand has no CPU kernel.
        if self.z_keep is None:  # keep_prob 0 (always drop) or 1 (never)
            return ops.full((x.shape[0],), 1.0 if self.keep_prob >= 1.0 else 0.0, dtype=ms.float32)
        draw = ops.randn((x.shape[0],), dtype=ms.float32)
        return (draw < self.z_keep).astype(ms.float32) / self.keep_prob

    def residual(self, x, y):
        """x + drop_path(y), the Block's residual connection."""
        if not self.training:
            return x + y
        if self.fused and x.dtype == ms.float32 and y.dtype == ms.float32:
            return self.add_row_scale(x, y, self.sample_scale(y))
        return x + self.construct(y)

    def construct(self, x):
        if not self.training:
            return x
        scale = self.sample_scale(x)
        if self.fused and x.dtype == ms.float32:
            return self.row_scale(x, scale)
        # timm computes x.div(keep_prob) * mask; scaling the (B,) mask first is the same value up
        # to one rounding and makes one full-size temporary instead of two.
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * scale.reshape(shape).astype(x.dtype)


class ExactGELU(nn.Cell):
    """torch.nn.GELU() (approximate='none'): 0.5 * x * (1 + erf(x / sqrt(2))).

    On CPU, MindSpore 2.10's fused GELU kernel is slow (forward ~9x, forward+backward ~7x torch's
    on ViT-B MLP activations, docs/performance.md); the same formula from ``ops.erf`` and
    elementwise ops is ~2x faster forward and ~1.4x forward+backward, equal to 1 ulp. Elsewhere the
    fused kernel is kept. ``composed`` is fixed at construction from the device target.
    ``fused`` (default: on CPU when util_mindspore/cpu_kernels.py could build its library) runs
    fp32 input through the vectorised kernel instead (torch's own CPU erf approximation, ~10x
    faster than ``composed``). Mlp fuses fc1's bias add into the same kernel.
    """

    def __init__(self, composed=None, fused=None):
        super().__init__()
        if composed is None:
            composed = ms.get_context('device_target') == 'CPU'
        self.composed = bool(composed)
        self.fused = cpu_kernels.enabled() if fused is None else bool(fused)
        self.fused_gelu = cpu_kernels.gelu_op() if self.fused else None
        self.gelu = nn.GELU(approximate=False)  # MindSpore's default is the tanh approximation
        self.inv_sqrt2 = 1.0 / math.sqrt(2.0)

    def construct(self, x):
        if self.fused and x.dtype == ms.float32:
            return self.fused_gelu(x)
        if self.composed:
            return x * (0.5 * (1.0 + ops.erf(x * self.inv_sqrt2)))
        return self.gelu(x)


class Mlp(nn.Cell):
    def __init__(self, in_features, hidden_features, drop=0.):
        super().__init__()
        self.fc1 = _dense(in_features, hidden_features)
        self.act = ExactGELU()  # torch nn.GELU is the exact erf form
        self.drop1 = nn.Dropout(p=drop) if drop > 0 else nn.Identity()
        self.fc2 = _dense(hidden_features, in_features)
        self.drop2 = nn.Dropout(p=drop) if drop > 0 else nn.Identity()
        self.fused = cpu_kernels.enabled()
        # without oneDNN's GEMM (fc1.linear is None): fc1's bias add and the GELU in one kernel
        self.bias_gelu = cpu_kernels.bias_gelu_op() if self.fused and self.fc1.linear is None else None

    def construct(self, x):
        if self.bias_gelu is None:
            # with oneDNN's GEMM: fc1 is one operator (bias included), act the fused GELU
            return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
        h = self.fc1.matmul_2d(x)  # once: a non-fp32 h takes the unfused bias add and GELU
        if h.dtype == ms.float32:
            h = self.bias_gelu(h, self.fc1.bias)
        else:
            h = self.act(self.fc1.add_bias(h))
        return self.drop2(self.fc2(self.drop1(h))).reshape(x.shape)


class SwiGLUPacked(nn.Cell):
    """timm GluMlp(act_layer=SiLU, gate_last=False) as used by vit_giant_patch14_dinov2.

    fc1 holds DINOv2's packed ``w12`` (both halves), fc2 its ``w3``.
    """

    def __init__(self, in_features, hidden_features, drop=0.):
        super().__init__()
        assert hidden_features % 2 == 0
        self.fc1 = _dense(in_features, hidden_features)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(p=drop) if drop > 0 else nn.Identity()
        self.fc2 = _dense(hidden_features // 2, in_features)
        self.drop2 = nn.Dropout(p=drop) if drop > 0 else nn.Identity()
        self.half = hidden_features // 2

    def construct(self, x):
        x = self.fc1(x)
        x1 = x[..., :self.half]
        x2 = x[..., self.half:]
        x = self.act(x1) * x2
        return self.drop2(self.fc2(self.drop1(x)))


class Block(nn.Cell):
    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, attn_drop=0., proj_drop=0.,
                 drop_path=0., init_values=None, mlp_layer='mlp', norm_eps=1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        hidden = int(dim * mlp_ratio)
        if mlp_layer == 'swiglu_packed':
            self.mlp = SwiGLUPacked(dim, hidden, drop=proj_drop)
        else:
            self.mlp = Mlp(dim, hidden, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.has_drop_path = drop_path > 0.

    def construct(self, x):
        if self.has_drop_path:
            x = self.drop_path1.residual(x, self.ls1(self.attn(self.norm1(x))))
            return self.drop_path2.residual(x, self.ls2(self.mlp(self.norm2(x))))
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class VisionTransformer(nn.Cell):
    """ViT as the original computes it under timm 0.9.x.

    global_pool=True: mean of the patch tokens -> fc_norm (no final ``norm``).
    global_pool=False: final ``norm`` -> class token (also timm's DINOv2 'token' pooling).

    fc_norm_twice (default True, global_pool only):
    # PARITY: fc_norm is applied twice (models_vit.py VisionTransformer.forward_features
    # returns fc_norm(mean), then timm 0.9's forward_head applies self.fc_norm again
    # because RETFound set self.global_pool=True). Pass fc_norm_twice=False for the
    # single-norm function of the MAE/timm-0.3 era.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4., qkv_bias=True, drop_rate=0., pos_drop_rate=0.,
                 attn_drop_rate=0., proj_drop_rate=0., drop_path_rate=0., init_values=None, global_pool=False,
                 fc_norm_twice=True, mlp_layer='mlp', norm_eps=1e-6):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.global_pool = bool(global_pool)
        self.fc_norm_twice = bool(fc_norm_twice) and self.global_pool
        self.num_prefix_tokens = 1
        self.depth = depth

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        # timm init: cls_token ~ N(0, 1e-6), pos_embed ~ trunc_normal(.02)
        self.cls_token = Parameter(Tensor((np.random.standard_normal((1, 1, embed_dim)) * 1e-6).astype(np.float32)),
                                   name='cls_token')
        self.pos_embed = Parameter(trunc_normal((1, num_patches + 1, embed_dim)), name='pos_embed')
        # timm 0.9: pos_drop_rate after the position embedding, drop_rate only before the head
        self.pos_drop = nn.Dropout(p=pos_drop_rate) if pos_drop_rate > 0 else nn.Identity()

        dpr = [float(v) for v in np.linspace(0, drop_path_rate, depth)]  # stochastic depth decay rule
        self.blocks = nn.CellList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                  proj_drop=proj_drop_rate, drop_path=dpr[i], init_values=init_values, mlp_layer=mlp_layer,
                  norm_eps=norm_eps)
            for i in range(depth)])

        if self.global_pool:
            self.fc_norm = LayerNorm(embed_dim, eps=norm_eps)  # the original deletes self.norm here
        else:
            self.norm = LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(p=drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = _dense(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self):
        return {'pos_embed', 'cls_token', 'dist_token'}

    def forward_features(self, x):
        """The original's forward_features: pooled, normalised features (B, D)."""
        b = x.shape[0]
        x = self.patch_embed(x)
        cls_tokens = ops.broadcast_to(self.cls_token, (b, 1, self.embed_dim))
        x = ops.concat((cls_tokens, x), axis=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            x = x[:, 1:, :].mean(axis=1)
            return self.fc_norm(x)
        x = self.norm(x)
        return x[:, 0]

    def forward_head(self, x):
        if self.fc_norm_twice:
            x = self.fc_norm(x)  # PARITY: see the class docstring
        return self.head(self.head_drop(x))

    def construct(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------
# Factories: same names and keyword arguments as the original models_vit.py.
# ---------------------------------------------------------------------------
_VIT_COMMON = dict(mlp_ratio=4, qkv_bias=True, norm_eps=1e-6)


def RETFound_mae(**kwargs):
    """ViT-L/16 (embed 1024, depth 24, 16 heads), RETFound MAE weights."""
    return VisionTransformer(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_VIT_COMMON, **kwargs)


def vit_tiny_patch16(**kwargs):
    """MindSpore addition (timm's ViT-Ti/16 shape) for demos and smoke tests on CPU."""
    return VisionTransformer(patch_size=16, embed_dim=192, depth=12, num_heads=3, **_VIT_COMMON, **kwargs)


def vit_small_patch16(**kwargs):
    """MindSpore addition (timm's ViT-S/16 shape)."""
    return VisionTransformer(patch_size=16, embed_dim=384, depth=12, num_heads=6, **_VIT_COMMON, **kwargs)


def vit_base_patch16(**kwargs):
    return VisionTransformer(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_VIT_COMMON, **kwargs)


def vit_large_patch16(**kwargs):
    return VisionTransformer(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_VIT_COMMON, **kwargs)


def vit_huge_patch14(**kwargs):
    return VisionTransformer(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_VIT_COMMON, **kwargs)


# timm 0.9.16 vit_*_patch14_dinov2 configurations (init_values=1e-5 -> LayerScale).
DINOV2_ARCHS = {
    'dinov2_vits14': dict(patch_size=14, embed_dim=384, depth=12, num_heads=6),
    'dinov2_vitb14': dict(patch_size=14, embed_dim=768, depth=12, num_heads=12),
    'dinov2_vitl14': dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    'dinov2_vitg14': dict(patch_size=14, embed_dim=1536, depth=40, num_heads=24,
                          mlp_ratio=2.66667 * 2, mlp_layer='swiglu_packed'),
}


def _dinov2(arch, kwargs):
    # The original calls timm.create_model(..., img_size=224, **kwargs): the image size is fixed
    # at 224 and timm's 'token' pooling applies (norm -> class token); --global_pool is not used.
    kwargs = dict(kwargs)
    kwargs.pop('global_pool', None)
    kwargs.pop('img_size', None)
    cfg = dict(mlp_ratio=4, qkv_bias=True, norm_eps=1e-6, init_values=1e-5)
    cfg.update(DINOV2_ARCHS[arch])
    cfg.update(kwargs)  # e.g. depth=2 for a quick structural test
    return VisionTransformer(img_size=224, global_pool=False, **cfg)


def RETFound_dinov2(args=None, **kwargs):
    """ViT-L/14 at 224 with LayerScale, as timm's vit_large_patch14_dinov2."""
    return _dinov2('dinov2_vitl14', kwargs)


def Dinov2(args=None, model_arch=None, **kwargs):
    """DINOv2 backbones chosen by --model_arch (dinov2_vits14/vitb14/vitl14/vitg14)."""
    arch = model_arch if model_arch is not None else getattr(args, 'model_arch', None)
    if arch not in DINOV2_ARCHS:
        raise ValueError(f"Unknown model_arch '{arch}'. Expected one of: {', '.join(DINOV2_ARCHS)}")
    return _dinov2(arch, kwargs)


MODEL_NAMES = ['RETFound_mae', 'RETFound_dinov2', 'Dinov2',
               'vit_base_patch16', 'vit_large_patch16', 'vit_huge_patch14',
               'vit_tiny_patch16', 'vit_small_patch16']
