"""The PyTorch original's code path, for parity tests (imports torch and timm 0.9.x).

The original (rmaphoh/RETFound @ ae9a9ec) is not installable from PyPI, so its thin layer over
timm is re-stated here *as test fixture*, line for line in behaviour, on top of the real timm
0.9.16 classes it subclasses. Everything heavy (Block, Attention, Mlp, PatchEmbed, LayerScale,
forward_head) is timm's own code, run as the original runs it.

- ``RetfoundVisionTransformer``: models_vit.py VisionTransformer (global-pool subclass).
- ``lr_decay_param_groups`` / ``get_layer_id_for_vit``: util/lr_decay.py.
- ``adjust_learning_rate``: util/lr_sched.py.
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import timm.models.vision_transformer as tvit
from timm.layers import SwiGLUPacked


class RetfoundVisionTransformer(tvit.VisionTransformer):
    """models_vit.py: VisionTransformer(global_pool=..., **kwargs) under timm 0.9.x."""

    def __init__(self, global_pool=False, **kwargs):
        super().__init__(**kwargs)
        self.global_pool = global_pool  # overwrites timm's 'token' string with a bool
        if self.global_pool:
            self.fc_norm = kwargs['norm_layer'](kwargs['embed_dim'])
            del self.norm

    def forward_features(self, x):
        B = x.shape[0]
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            x = x[:, 1:, :].mean(dim=1, keepdim=True)
            outcome = self.fc_norm(x)
        else:
            x = self.norm(x)
            outcome = x[:, 0]
        return outcome

    def forward_single_norm(self, x):
        """timm-0.3 era forward (MAE/Nature): head(forward_features(x)), one fc_norm."""
        out = self.forward_features(x)
        if out.ndim == 3:
            out = out[:, 0]
        return self.head(out)


def retfound_vit(global_pool=True, **kwargs):
    """RETFound_mae's construction with a configurable (tiny) size."""
    cfg = dict(mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(kwargs)
    return RetfoundVisionTransformer(global_pool=global_pool, **cfg)


def timm_dinov2(swiglu=False, **kwargs):
    """timm's vit_*_patch14_dinov2 construction (as timm.create_model builds it), sizes configurable."""
    cfg = dict(patch_size=14, init_values=1e-5, img_size=224)
    if swiglu:
        cfg.update(mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    cfg.update(kwargs)
    return tvit.VisionTransformer(**cfg)


def randomize_(model, seed=0):
    """Random weights everywhere, LayerNorm and LayerScale included (defaults would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if ('norm' in name or 'ls' in name)
                        and name.endswith(('weight', 'gamma')) else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def state_dict_numpy(model):
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


# ---- util/lr_decay.py -------------------------------------------------------------------
def get_layer_id_for_vit(name, num_layers):
    if name in ['cls_token', 'pos_embed']:
        return 0
    elif name.startswith('patch_embed'):
        return 0
    elif name.startswith('blocks'):
        return int(name.split('.')[1]) + 1
    else:
        return num_layers


def lr_decay_param_groups(model, weight_decay=0.05, no_weight_decay_list=(), layer_decay=.75):
    param_groups = {}
    num_layers = len(model.blocks) + 1
    layer_scales = list(layer_decay ** (num_layers - i) for i in range(num_layers + 1))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or n in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.
        else:
            g_decay, this_decay = "decay", weight_decay
        layer_id = get_layer_id_for_vit(n, num_layers)
        group_name = "layer_%d_%s" % (layer_id, g_decay)
        if group_name not in param_groups:
            param_groups[group_name] = {"lr_scale": layer_scales[layer_id], "weight_decay": this_decay,
                                        "params": [], "names": []}
        param_groups[group_name]["params"].append(p)
        param_groups[group_name]["names"].append(n)
    return list(param_groups.values())


# ---- util/lr_sched.py -------------------------------------------------------------------
def adjust_learning_rate(optimizer, epoch, args):
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * \
            (1. + math.cos(math.pi * (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)))
    for param_group in optimizer.param_groups:
        if "lr_scale" in param_group:
            param_group["lr"] = lr * param_group["lr_scale"]
        else:
            param_group["lr"] = lr
    return lr


def to_numpy_input(x):
    return np.ascontiguousarray(x.detach().cpu().numpy())
