# --------------------------------------------------------
# Layer-wise learning-rate decay parameter groups.
# Derived from: rmaphoh/RETFound util/lr_decay.py (MAE, after BEiT optim_factory.py).
# Written anew for MindSpore: groups are plain data (lr_scale, weight_decay, parameter
# names) before any optimizer sees them, so they can be printed and tested.
# --------------------------------------------------------


def param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=(), layer_decay=.75):
    """Parameter groups for layer-wise lr decay (same grouping and order as the original).

    Returns a list of dicts ``{"lr_scale", "weight_decay", "params", "param_names"}`` where
    ``params`` are the model's trainable ``Parameter`` objects (``requires_grad=True``).
    """
    param_groups = {}
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]

    for p in model.get_parameters():
        if not p.requires_grad:
            continue
        n = p.name
        # no decay: all 1D parameters and model-specific ones
        if len(p.shape) == 1 or n in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.
        else:
            g_decay, this_decay = "decay", weight_decay
        layer_id = get_layer_id_for_vit(n, num_layers)
        group_name = "layer_%d_%s" % (layer_id, g_decay)
        if group_name not in param_groups:
            param_groups[group_name] = {"lr_scale": layer_scales[layer_id], "weight_decay": this_decay,
                                        "params": [], "param_names": []}
        param_groups[group_name]["params"].append(p)
        param_groups[group_name]["param_names"].append(n)
    return list(param_groups.values())


def get_layer_id_for_vit(name, num_layers):
    """cls_token/pos_embed/patch_embed -> 0, blocks.i -> i + 1, everything else -> num_layers."""
    if name in ('cls_token', 'pos_embed'):
        return 0
    if name.startswith('patch_embed'):
        return 0
    if name.startswith('blocks'):
        return int(name.split('.')[1]) + 1
    return num_layers
