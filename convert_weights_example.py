# --------------------------------------------------------
# RETFound for MindSpore: convert RETFound weights once and check them with a forward pass.
# Derived from: rmaphoh/RETFound main_finetune.py (model construction and the --finetune flags);
# written anew. torch is not needed.
#
#   python convert_weights_example.py --finetune RETFound_mae_natureCFP --model RETFound_mae
#   python convert_weights_example.py --finetune RETFound_dinov2_meh --model RETFound_dinov2
#   python convert_weights_example.py --finetune ./my_dinov2.pth --model Dinov2 --model_arch dinov2_vitl14
#
# The converted backbone lands in --cache_dir (reused by main_finetune_mindspore.py --finetune).
# Exits non-zero on any failure.
# --------------------------------------------------------
import argparse
import os
import sys

import numpy as np

from util_mindspore.weight_converter import WeightLoadError, load_pretrained, resolve_finetune


def get_args_parser():
    parser = argparse.ArgumentParser('Convert RETFound weights to MindSpore and run one forward pass')
    parser.add_argument('--finetune', required=True,
                        help='published name (e.g. RETFound_mae_natureCFP) or a local .pth/.ckpt/.safetensors')
    parser.add_argument('--model', default=None, type=str,
                        help='RETFound_mae, RETFound_dinov2, Dinov2, vit_base_patch16, vit_large_patch16, ... '
                             '(default: RETFound_dinov2 for a *dinov2* name, else RETFound_mae)')
    parser.add_argument('--model_arch', default='dinov2_vitl14', type=str, help='for --model Dinov2')
    parser.add_argument('--cache_dir', default='./weights_cache', type=str)
    parser.add_argument('--input_size', default=224, type=int,
                        help='image size (RETFound_dinov2/Dinov2 are built at 224, as in the original)')
    parser.add_argument('--nb_classes', default=8, type=int)
    parser.add_argument('--global_pool', action='store_true')
    parser.set_defaults(global_pool=True)
    parser.add_argument('--cls_token', action='store_false', dest='global_pool',
                        help='use the class token instead of global pooling')
    return parser


def build_model(args):
    import models_vit_mindspore as models
    if args.model not in models.MODEL_NAMES:
        raise WeightLoadError(f"unknown --model '{args.model}' (expected one of: {', '.join(models.MODEL_NAMES)})")
    factory = getattr(models, args.model)
    if args.model in ('RETFound_dinov2', 'Dinov2'):  # the original passes args; image size fixed at 224
        return factory(num_classes=args.nb_classes, drop_path_rate=0.0, args=args)
    return factory(img_size=args.input_size, num_classes=args.nb_classes, drop_path_rate=0.0,
                   global_pool=args.global_pool)


def default_model(finetune):
    """The architecture the published weights belong to (RETFound_dinov2_* vs RETFound_mae_*)."""
    return 'RETFound_dinov2' if 'dinov2' in os.path.basename(str(finetune)).lower() else 'RETFound_mae'


def main(args):
    if args.model is None:
        args.model = default_model(args.finetune)
        print(f'--model not given: using {args.model} for {args.finetune}')
    try:
        resolve_finetune(args.finetune)  # fail fast (unknown name, no access) before building a ViT-L
        model = build_model(args)
        info = load_pretrained(model, args.finetune, args.model, cache_dir=args.cache_dir)
        import mindspore as ms
        model.set_train(False)
        size = model.patch_embed.img_size[0]
        x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        logits = model(ms.Tensor(x)).asnumpy()
        if logits.shape != (1, args.nb_classes) or not np.isfinite(logits).all():
            raise WeightLoadError(f'forward pass gave logits of shape {logits.shape} '
                                  f'(finite: {bool(np.isfinite(logits).all())})')
    except (WeightLoadError, ValueError) as e:
        print(f'ERROR: {e}', file=sys.stderr)
        return 1
    print(f"Converted weights: {info['cache'] or '(cache disabled)'}")
    print(f"Source: {info['source']}  entry: {info['entry']}  loaded: {info['loaded']} tensors")
    print(f"Missing: {', '.join(info['missing']) or '-'}")
    print(f"Unexpected: {', '.join(info['unexpected']) or '-'}")
    print(f'Forward pass OK: input {x.shape} -> logits {logits.shape}')
    return 0


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))
