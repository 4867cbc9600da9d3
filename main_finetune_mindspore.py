#!/usr/bin/env python3
# --------------------------------------------------------
# RETFound for MindSpore: fine-tuning, linear probing and evaluation.
# Derived from: rmaphoh/RETFound main_finetune.py (MAE main_finetune.py). Written anew:
# same flags, defaults and output files; MindSpore additions --device, --mode, --amp_level,
# --cpu_bf16, --weights_cache_dir, --single_fc_norm, --skip_bad_images.
# --------------------------------------------------------
import argparse
import datetime
import json
import os
import random
import re
import time
from pathlib import Path

import numpy as np


def get_args_parser():
    parser = argparse.ArgumentParser(
        "RETFound (MindSpore) fine-tuning / linear probing for image classification", add_help=False)

    g = parser.add_argument_group("core training")
    g.add_argument("--batch_size", default=128, type=int,
                   help="Batch size per device (effective batch size = batch_size * accum_iter * #devices)")
    g.add_argument("--epochs", default=50, type=int)
    g.add_argument("--accum_iter", default=1, type=int, help="Gradient accumulation steps")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="vit_large_patch16", type=str, metavar="MODEL",
                   help="RETFound_mae | RETFound_dinov2 | Dinov2 | vit_base_patch16 | vit_large_patch16 | "
                        "vit_huge_patch14 | vit_tiny_patch16, vit_small_patch16 (small, for demos) "
                        "(Dinov3 is not ported)")
    g.add_argument("--model_arch", default="dinov3_vits16", type=str, metavar="MODEL_ARCH",
                   help="Backbone key for --model Dinov2: dinov2_vits14 | dinov2_vitb14 | dinov2_vitl14 | "
                        "dinov2_vitg14")
    g.add_argument("--input_size", default=256, type=int, help="Image size")
    g.add_argument("--drop_path", type=float, default=0.2, metavar="PCT", help="Drop path rate")
    g.add_argument("--global_pool", action="store_true")
    parser.set_defaults(global_pool=True)
    g.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="Use class token instead of global pool for classification")
    g.add_argument("--single_fc_norm", action="store_true", default=False,
                   help="[MindSpore] apply fc_norm once (MAE/timm-0.3 era) instead of twice as the original "
                        "computes under timm 0.9 (see README: Differences)")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--clip_grad", type=float, default=None, metavar="NORM", help="Clip grad norm")
    g.add_argument("--weight_decay", type=float, default=0.05, help="Weight decay")
    g.add_argument("--lr", type=float, default=None, metavar="LR", help="Absolute LR (overrides blr)")
    g.add_argument("--blr", type=float, default=5e-3, metavar="LR",
                   help="Base LR: lr = blr * total_batch_size / 256")
    g.add_argument("--layer_decay", type=float, default=0.65, help="Layer-wise LR decay (ViT)")
    g.add_argument("--min_lr", type=float, default=1e-6, metavar="LR", help="Lower LR bound")
    g.add_argument("--warmup_epochs", type=int, default=10, metavar="N", help="Warmup epochs")

    g = parser.add_argument_group("augmentation")
    g.add_argument("--color_jitter", type=float, default=None, metavar="PCT",
                   help="Color jitter factor (only used when --aa is off)")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                   help='RandAugment policy, e.g. rand-m9-mstd0.5-inc1, or "none"')
    g.add_argument("--smoothing", type=float, default=0.1,
                   help="Label smoothing (acts only through Mixup/CutMix soft targets, as the original)")
    g.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="Random erase prob")
    g.add_argument("--remode", type=str, default="pixel", help="Random erase mode")
    g.add_argument("--recount", type=int, default=1, help="Random erase count")
    g.add_argument("--resplit", action="store_true", default=False,
                   help="Do not random erase first (clean) augmentation split")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha, mixup enabled if > 0")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha, cutmix enabled if > 0")
    g.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                   help="cutmix min/max ratio, overrides alpha and enables cutmix if set")
    g.add_argument("--mixup_prob", type=float, default=1.0)
    g.add_argument("--mixup_switch_prob", type=float, default=0.5)
    g.add_argument("--mixup_mode", type=str, default="batch", help='"batch", "pair" or "elem"')

    g = parser.add_argument_group("fine-tuning and adaptation")
    g.add_argument("--finetune", default="", type=str,
                   help="Pre-trained weights: a published name (RETFound_mae_natureCFP, RETFound_mae_natureOCT, "
                        "RETFound_mae_meh, RETFound_mae_shanghai, RETFound_dinov2_meh, RETFound_dinov2_shanghai) "
                        "or any other NAME of huggingface.co/YukunZhou/NAME (downloaded, as the original), "
                        "or a local .pth/.ckpt/.safetensors")
    g.add_argument("--task", default="", type=str, help="Task name for logging/output grouping")
    g.add_argument("--adaptation", default="finetune", choices=["finetune", "lp"],
                   help="finetune = full fine-tune, lp = linear probe (train head only)")
    g.add_argument("--weights_cache_dir", default="./weights_cache", type=str,
                   help="[MindSpore] where converted MindSpore checkpoints of --finetune weights are cached")

    g = parser.add_argument_group("dataset and paths")
    g.add_argument("--data_path", default="./data/", type=str, help="Folder with train/ val/ test/ class folders")
    g.add_argument("--nb_classes", default=8, type=int, help="Number of classes")
    g.add_argument("--output_dir", default="./output_dir", help="Where checkpoints and metrics go ({task}/)")
    g.add_argument("--log_dir", default="./output_logs", help="TensorBoard event files ({task}/)")
    g.add_argument("--dataratio", type=str, default="1.0",
                   help="Training data ratio in (0, 1] for subsampling the train split")
    g.add_argument("--stratified", action="store_true", help="Subsample training data class-stratified")
    g.add_argument("--skip_bad_images", action="store_true", default=False,
                   help="[MindSpore] drop unreadable images (reported) instead of stopping before training")

    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default=None,
                   help="[MindSpore] CPU | GPU | Ascend (default: what the installed MindSpore targets; "
                        "the original's 'cuda'/'cpu' are accepted)")
    g.add_argument("--mode", default="graph", choices=["graph", "pynative", "jit"],
                   help="[MindSpore] graph: GRAPH_MODE, compiled (default); pynative: PYNATIVE_MODE, eager; "
                        "jit: PYNATIVE_MODE with the train step compiled by @mindspore.jit")
    g.add_argument("--amp_level", default="O0", choices=["O0", "O1", "O2", "O3"],
                   help="[MindSpore] mixed precision level (O0 = fp32, the original's behaviour on CPU)")
    g.add_argument("--cpu_bf16", action="store_true",
                   help="[MindSpore, CPU] Linear layers and the attention core multiply in bfloat16 (fp32 "
                        "accumulation, fp32 weights, activations and softmax) through oneDNN, like "
                        "torch.autocast('cpu', torch.bfloat16); ~1.8x faster training than fp32 on CPUs with "
                        "AVX512-BF16/AMX")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="Resume from checkpoint (.ckpt of ours, or the original's .pth: its "
                   "weights and args, as the original; AdamW moments start from zero)")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="Start epoch")
    g.add_argument("--eval", action="store_true", help="Evaluation only (test split)")
    g.add_argument("--dist_eval", action="store_true", default=False,
                   help="Distributed evaluation (shard val/test across ranks, gather predictions)")
    g.add_argument("--num_workers", default=10, type=int, help="Data workers (capped at the CPU count)")
    g.add_argument("--pin_mem", action="store_true", help="Accepted for compatibility (no effect in MindSpore)")
    parser.set_defaults(pin_mem=True)

    g = parser.add_argument_group("distributed (launch with msrun; see README)")
    g.add_argument("--world_size", default=1, type=int, help="Accepted; msrun sets the real world size")
    g.add_argument("--local_rank", default=-1, type=int, help="Accepted for compatibility (no effect)")
    g.add_argument("--dist_on_itp", action="store_true", help="Accepted for compatibility (no effect)")
    g.add_argument("--dist_url", default="env://", help="Accepted for compatibility (no effect)")

    g = parser.add_argument_group("misc")
    g.add_argument("--savemodel", action="store_true", default=True, help="Save best model")
    g.add_argument("--norm", default="IMAGENET", type=str, help="Normalization (IMAGENET, as the original)")
    g.add_argument("--enhance", action="store_true", default=False, help="Accepted (unused, as in the original)")
    g.add_argument("--datasets_seed", default=2026, type=int, help="Accepted (unused, as in the original)")
    return parser


# entries of our checkpoints that are not model weights (optimizer moments, loss-scale state)
_STATE_PREFIXES = ("optimizer.", "scaler.")


def _configure_cpu_bf16(args):
    """--cpu_bf16: check it can run here, then switch the models built afterwards to bf16 GEMMs."""
    import mindspore as ms
    from util_mindspore import cpu_kernels
    cpu_kernels.set_bf16_matmul(False)  # never inherit a previous main() call's setting
    if not args.cpu_bf16:
        return
    if ms.get_context("device_target") != "CPU":
        raise SystemExit("--cpu_bf16 is for CPU training; on GPU/Ascend use --amp_level O2 (float16)")
    if args.amp_level != "O0":
        raise SystemExit("--cpu_bf16 cannot be combined with --amp_level: it keeps fp32 weights and activations "
                         "and multiplies in bfloat16 only inside the Linear layers")
    if not cpu_kernels.linear_available(bf16=True):
        raise SystemExit(f"--cpu_bf16 needs the fused CPU kernels with oneDNN's bf16 GEMM. {cpu_kernels.status()}")
    if not cpu_kernels.cpu_has_bf16():
        print("WARNING: --cpu_bf16: this CPU has no AVX512-BF16/AMX instructions; bf16 GEMMs will be slower than fp32")
    cpu_kernels.set_bf16_matmul(True)


def _resolve_device(name):
    import mindspore as ms
    if name is None:
        return ms.get_context("device_target")
    aliases = {"cuda": "GPU", "gpu": "GPU", "cpu": "CPU", "ascend": "Ascend", "npu": "Ascend"}
    key = str(name).split(":")[0].lower()
    if key not in aliases:
        raise SystemExit(f"--device {name!r}: expected CPU, GPU or Ascend")
    return aliases[key]


def build_model(args):
    import models_vit_mindspore as models
    common = dict(num_classes=args.nb_classes, drop_path_rate=args.drop_path)
    if args.model in ("RETFound_mae", "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14",
                      "vit_tiny_patch16", "vit_small_patch16"):
        return getattr(models, args.model)(img_size=args.input_size, global_pool=args.global_pool,
                                           fc_norm_twice=not args.single_fc_norm, **common)
    if args.model in ("RETFound_dinov2", "Dinov2"):
        if args.input_size != 224:
            raise SystemExit(f"--model {args.model} is built at 224x224 as in the original "
                             f"(timm.create_model(..., img_size=224)); pass --input_size 224 "
                             f"(got {args.input_size})")
        try:
            return getattr(models, args.model)(args=args, **common)
        except ValueError as e:  # e.g. the original's default --model_arch dinov3_vits16 with --model Dinov2
            raise SystemExit(f"--model {args.model}: {e}")
    if args.model == "Dinov3":
        raise SystemExit("--model Dinov3 is not ported yet (the original loads it with torch.hub); "
                         "use RETFound_mae, RETFound_dinov2 or Dinov2")
    raise SystemExit(f"Unknown --model {args.model!r}; expected one of {', '.join(models.MODEL_NAMES)}")


def _rewrite_atomic(path, lines):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:  # the lines keep their own endings
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _count_lines(path):
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def _trim_outputs_for_resume(task_dir, state):
    """A run killed after writing an epoch's rows but before its checkpoint would repeat that epoch
    on --resume. The latest checkpoint records how many lines log.txt and metrics_val.csv had when it
    was saved; cut both back to that. Returns the kept log rows (for the training-curve plot)."""
    import util_mindspore.misc as misc
    for name, key in (("log.txt", "log_lines"), ("metrics_val.csv", "metrics_val_lines")):
        path = os.path.join(task_dir, name)
        keep = int(state.get(key, -1)) if state else -1
        if keep >= 0 and os.path.isfile(path):
            with open(path, encoding="utf-8", newline="") as f:  # csv rows end in \r\n: keep them
                lines = f.readlines()
            if len(lines) > keep:
                print(f"--resume: dropping {len(lines) - keep} line(s) of {name} written after the checkpoint")
                _rewrite_atomic(path, lines[:keep])
    return misc.read_log(os.path.join(task_dir, "log.txt"))


def _check_output_dir(path):
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--output_dir {path!r} is not writable ({e}); choose another folder")


def main(args):
    import mindspore as ms
    import util_mindspore.misc as misc
    import util_mindspore.lr_decay as lrd
    from util_mindspore.datasets import (build_dataset, create_loader, check_data_layout, scan_images, find_classes,
                                         DatasetError)
    from util_mindspore.mixup import Mixup
    from util_mindspore.optim import AdamW, LossScaler
    from util_mindspore.weight_converter import load_pretrained, load_model_weights, WeightLoadError
    from util_mindspore.tb_writer import SummaryWriter
    from util_mindspore.metrics import save_training_curves
    from engine_finetune_mindspore import train_one_epoch, evaluate, Stepper

    # ---- Resume (training): the original replaces args with the checkpoint's args
    if args.resume and not args.eval:
        try:
            saved = misc.read_checkpoint_args(args.resume)
        except (misc.CheckpointError, WeightLoadError) as e:
            raise SystemExit(f"--resume: {e}")
        if saved:
            resume_path, device = args.resume, args.device
            for k, v in saved.items():
                setattr(args, k, v)
            args.resume = resume_path
            print(f"Load checkpoint (args) from: {args.resume}")
            if device is not None or not resume_path.endswith(".ckpt"):
                # A --device given on the command line stays (a run may be resumed on another
                # kind of device); so does the default for the original's .pth, whose 'cuda'
                # names a torch device and says nothing about this machine's MindSpore.
                args.device = device

    # the device comes first: communication.init() picks mccl/nccl/hccl from it
    device = _resolve_device(args.device)
    try:
        ms.set_device(device)
    except (RuntimeError, ValueError) as e:
        # A second main() in one process (a notebook, a test) finds the runtime already running:
        # fine when it runs on the device asked for.
        if not ("has been initialized" in str(e) and ms.get_context("device_target") == device):
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise SystemExit(f"--device {device}: this MindSpore installation cannot use it ({first}). Install the "
                             f"MindSpore {ms.__version__} build for your {device} "
                             f"(https://www.mindspore.cn/install) or pass --device CPU.")
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    _configure_cpu_bf16(args)
    misc.init_distributed_mode(args)
    print(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    print(f"{args}".replace(", ", ",\n"))

    # The model (and the re-initialised head) is built from args.seed on every rank, so all ranks
    # start identical: MindSpore has no DDP-style broadcast of rank 0's weights at wrap time.
    ms.set_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    task_dir = os.path.join(args.output_dir, args.task)
    if misc.is_main_process():
        _check_output_dir(task_dir)

    # ---- Data layout first: fail before any model build or compile
    splits = ("test",) if args.eval else ("train", "val", "test")
    try:
        class_names = check_data_layout(args.data_path, args.nb_classes, need=splits)
    except DatasetError as e:
        raise SystemExit(f"Data error: {e}")
    train_root = os.path.join(args.data_path, "train")
    if args.eval and os.path.isdir(train_root):
        train_classes = find_classes(train_root)
        if train_classes != class_names:
            print(f"WARNING: test/ has classes {class_names} but train/ has {train_classes}: the labels follow "
                  f"test/'s own sorted folders (index 0 = {class_names[0]!r}), as in the original; check that "
                  f"the model's class indices mean the same classes")

    # ---- Datasets & loaders, before the model: the loaders fork their worker processes now, while
    # the process is small (a worker forked after the model exists pins a copy-on-write image of
    # every parameter page the training then rewrites: ~1.2 GB per worker for ViT-L)
    num_tasks, global_rank = misc.get_world_size(), misc.get_rank()
    try:
        datasets = {s: build_dataset(is_train=s, args=args) for s in splits}
        n_bad = scan_images(list(datasets.values()), skip_bad=args.skip_bad_images)
    except DatasetError as e:
        raise SystemExit(f"Data error: {e}")
    except (ValueError, NotImplementedError) as e:  # the augmentation flags (--aa, --remode, ...)
        raise SystemExit(f"Augmentation settings: {e}")
    if n_bad:
        print(f"Skipped {n_bad} unreadable image(s) (--skip_bad_images)")

    shard = dict(num_shards=num_tasks, shard_id=global_rank) if num_tasks > 1 else {}
    eval_shard = shard if args.dist_eval else {}
    loader_train = loader_val = None
    if not args.eval:
        # PARITY: the original's DistributedSampler has no seed argument, so its shuffle order is
        # seeded with 0 whatever --seed is (main_finetune.py); augmentation draws still follow --seed.
        # set_epoch (below) reshuffles every epoch, as the original under its documented launcher,
        # torchrun (distributed even with one process); a plain `python main_finetune.py` run of
        # the original skips set_epoch and repeats epoch 0's order, which is not reproduced.
        loader_train = create_loader(datasets["train"], args.batch_size, shuffle=True, drop_last=True,
                                     num_workers=args.num_workers, seed=args.seed, shuffle_seed=0, **shard)
        if len(loader_train) == 0:
            raise SystemExit(f"--batch_size {args.batch_size} is larger than the training set "
                             f"({len(datasets['train'])} images{' per rank' if shard else ''}): with drop_last "
                             f"that is zero steps per epoch. Use a smaller --batch_size.")
        print(f"len of train_set: {len(loader_train) * args.batch_size}")
        loader_val = create_loader(datasets["val"], args.batch_size, shuffle=False, drop_last=False,
                                   num_workers=args.num_workers, seed=args.seed, **eval_shard)
    loader_test = create_loader(datasets["test"], args.batch_size, shuffle=False, drop_last=False,
                                num_workers=args.num_workers, seed=args.seed, **eval_shard)

    # ---- Model
    model = build_model(args)
    from util_mindspore import cpu_kernels
    print(cpu_kernels.status())  # fused fp32 CPU kernels: on, off, unavailable (and why), or not CPU

    # On --resume the checkpoint's full model state replaces every parameter (strictly) below, so the
    # pre-trained weights are not fetched again (the original re-loads them first: a needless download).
    if args.finetune and not args.eval and not args.resume:
        print(f"Preparing to load pre-trained weights: {args.finetune}")
        try:
            load_pretrained(model, args.finetune, args.model, cache_dir=args.weights_cache_dir)
        except WeightLoadError as e:
            raise SystemExit(f"Pre-trained weights: {e}")
    elif args.model in ("RETFound_dinov2", "Dinov2") and not args.eval and not args.resume:
        print("WARNING: the original starts --model %s from timm's DINOv2 weights (LVD-142M, tag .lvd142m) "
              "when --finetune is empty; this port does not download them. Pass --finetune NAME|PATH to start from "
              "pre-trained weights; training now starts from random initialisation." % args.model)

    # ---- Per-rank random streams from here on (drop path, Mixup), as the original's seed + rank
    seed = args.seed + misc.get_rank()
    ms.set_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    log_writer = None
    if global_rank == 0 and args.log_dir is not None and not args.eval:
        os.makedirs(args.log_dir, exist_ok=True)
        log_writer = SummaryWriter(log_dir=os.path.join(args.log_dir, args.task))

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        print("Mixup is activated!")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes,
                         rng=np.random.default_rng(seed))

    # ---- Eval-only: weights from --resume (ours or the original's .pth)
    checkpoint_meta = None
    if args.resume and args.eval:
        try:
            checkpoint_meta = load_model_weights(model, args.resume, extra_prefixes=_STATE_PREFIXES)
        except WeightLoadError as e:
            raise SystemExit(f"--resume: {e}")
        print(f"Load checkpoint for eval from: {args.resume}")

    # ---- Adaptation toggle
    if args.adaptation == "lp":
        for p in model.get_parameters():
            p.requires_grad = p.name.startswith("head.")
        print("[Adaptation] Linear probe: training classifier head only.")
    else:
        print("[Adaptation] Full fine-tuning: training all parameters.")
    n_parameters = sum(int(np.prod(p.shape)) for p in model.get_parameters() if p.requires_grad)
    print(f"number of trainable params (M): {n_parameters / 1.e6:.2f}")

    eff_batch_size = args.batch_size * args.accum_iter * num_tasks
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f"base lr: {args.lr * 256 / eff_batch_size:.2e}")
    print(f"actual lr: {args.lr:.2e}")
    print(f"accumulate grad iterations: {args.accum_iter}")
    print(f"effective batch size: {eff_batch_size}")

    if args.eval:
        if checkpoint_meta and "epoch" in checkpoint_meta:
            print(f"Test with the best model at epoch = {checkpoint_meta['epoch']}")
        evaluate(loader_test, model, device, args, epoch=0, mode="test", num_class=args.nb_classes,
                 log_writer=None, class_names=class_names)
        return

    param_groups = lrd.param_groups_lrd(model, weight_decay=args.weight_decay,
                                        no_weight_decay_list=model.no_weight_decay(),
                                        layer_decay=args.layer_decay)
    optimizer = AdamW(param_groups, lr=args.lr)
    loss_scaler = None
    if args.amp_level != "O0":
        # float16 compute as the original's CUDA autocast, with GradScaler-style dynamic loss scaling
        ms.amp.auto_mixed_precision(model, args.amp_level, dtype=ms.float16)
        loss_scaler = LossScaler()
        print(f"Mixed precision: {args.amp_level} (float16) with dynamic loss scaling")
    grad_reducer = misc.make_grad_reducer(optimizer.parameters) if num_tasks > 1 else None
    stepper = Stepper(model, optimizer, accum_iter=args.accum_iter, clip_grad=args.clip_grad,
                      soft_targets=mixup_fn is not None, grad_reducer=grad_reducer, loss_scaler=loss_scaler,
                      jit=args.mode == "jit")
    print("criterion = %s" % ("SoftTargetCrossEntropy (Mixup/CutMix targets)" if mixup_fn else "CrossEntropyLoss()"))

    # ---- Full state from --resume: model, optimizer, epoch, best score
    try:
        state = misc.load_model(args=args, model_without_ddp=model, optimizer=optimizer, loss_scaler=loss_scaler)
    except misc.CheckpointError as e:
        raise SystemExit(f"--resume: {e}")
    max_score = float(state.get("max_score", 0.0)) if state else 0.0
    best_epoch = int(state.get("best_epoch", 0)) if state else 0
    if state and state.get("format") != "pth":
        # A run killed after writing checkpoint-best for epoch E but before checkpoint-latest resumes
        # at E with the previous best score, while checkpoint-best already holds E's weights: keep
        # that best (weights, epoch and score agree) unless the re-run of E beats it.
        best = misc.read_checkpoint_meta(os.path.join(task_dir, "checkpoint-best.ckpt"))
        if "max_score" in best and int(best.get("epoch", -1)) > best_epoch and float(best["max_score"]) > max_score:
            max_score, best_epoch = float(best["max_score"]), int(best["epoch"])
            print(f"--resume: checkpoint-best.ckpt holds epoch {best_epoch} (score {max_score:.4f}), saved after "
                  f"checkpoint-latest: it stays the best unless a later epoch beats it")

    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    history = []
    if args.resume and misc.is_main_process():
        history = _trim_outputs_for_resume(task_dir, state)
    for epoch in range(args.start_epoch, args.epochs):
        loader_train.set_epoch(epoch)
        train_stats = train_one_epoch(model, None, loader_train, optimizer, device, epoch, None,
                                      args.clip_grad, mixup_fn, log_writer=log_writer, args=args, stepper=stepper)
        val_stats, val_score = evaluate(loader_val, model, device, args, epoch, mode="val",
                                        num_class=args.nb_classes, log_writer=log_writer, class_names=class_names)
        if max_score < val_score:
            max_score, best_epoch = val_score, epoch
            if args.output_dir and args.savemodel:
                misc.save_model(args=args, model=model, model_without_ddp=model, optimizer=optimizer,
                                loss_scaler=loss_scaler, epoch=epoch, mode="best", extra={"max_score": max_score})
        print(f"Best epoch = {best_epoch}, Best score = {max_score:.4f}")

        if log_writer is not None:
            log_writer.add_scalar("loss/val", val_stats["loss"], epoch)
            log_writer.flush()

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "n_parameters": n_parameters, "val_loss": val_stats["loss"], "val_score": val_score}
        if args.output_dir and misc.is_main_process():
            with open(os.path.join(task_dir, "log.txt"), "a", encoding="utf-8") as f:
                f.write(json.dumps(log_stats) + "\n")
            history.append(log_stats)
            save_training_curves(history, os.path.join(task_dir, "training_curves.png"))
            # Improvement: a latest checkpoint every epoch (optimizer state, best score) for --resume
            misc.save_model(args=args, model=model, model_without_ddp=model, optimizer=optimizer,
                            loss_scaler=loss_scaler, epoch=epoch, mode="latest",
                            extra={"max_score": max_score, "best_epoch": best_epoch,
                                   "log_lines": _count_lines(os.path.join(task_dir, "log.txt")),
                                   "metrics_val_lines": _count_lines(os.path.join(task_dir, "metrics_val.csv"))})

    # ---- Final test with the best checkpoint (as the original)
    best_path = os.path.join(task_dir, "checkpoint-best.ckpt")
    # --dist_eval: the ranks test shards of one model, so they must hold the same weights. Only rank 0
    # writes checkpoint-best; another rank may read it before rank 0's last save lands (and test an
    # older best), or not see it at all on another machine. Rank 0 loads it and sends it to all.
    sharded_test = args.dist_eval and num_tasks > 1
    if os.path.isfile(best_path) and (misc.is_main_process() or not sharded_test):
        meta = load_model_weights(model, best_path, extra_prefixes=_STATE_PREFIXES)
        print(f"Test with the best model, epoch = {meta.get('epoch', -1)}:")
    else:
        print("No best checkpoint was saved (val score never improved above 0): testing the last weights")
    if sharded_test:
        misc.broadcast_parameters(model)
    evaluate(loader_test, model, device, args, -1, mode="test", num_class=args.nb_classes, log_writer=None,
             class_names=class_names)
    if log_writer is not None:
        log_writer.close()
    total_time_str = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    print(f"Training time {total_time_str}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()],
                                     description="RETFound fine-tuning and evaluation on MindSpore")
    args = parser.parse_args()
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    try:
        main(args)
    except (RuntimeError, ValueError) as e:
        # An image that passed the pre-flight check but fails to decode when loaded: MindSpore's
        # pipeline wraps the worker's DatasetError in a RuntimeError with a long trace; say which file.
        found = re.search(r"(?:^|DatasetError: )(unreadable image [^\n]*)", str(e))
        if found is None:
            raise
        raise SystemExit(f"Data error: {found.group(1)}") from None
