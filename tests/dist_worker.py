"""Worker for tests/test_distributed.py: a few data-parallel train steps of a tiny ViT.

Run under msrun (2 workers): every rank builds the same model (numpy/MindSpore seeded before
the build), takes rows 4r:4r+4 of a fixed global batch of 8 and steps through the engine's
``Stepper`` with ``misc.make_grad_reducer``, then repeats the run without the reducer (the
negative control, ``ctrl_rank{R}.npz``). Run without msrun: one process trains on the whole
batch of 8. Every parameter is saved to ``OUT/params_rank{R}.npz`` (``params_single.npz``
when not distributed).

    python tests/dist_worker.py --out DIR [--steps 3] [--eps 1e-4]
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402

GLOBAL_BATCH = 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    # AdamW normalises each gradient by its own magnitude: where the true gradient is zero (the
    # attention key bias: softmax ignores a per-query constant) or cancels almost exactly, fp32
    # rounding noise (~1e-10) becomes a full +-lr step with eps 1e-8, so a 4+4-row and an 8-row
    # reduction order end 1e-5 apart. eps 1e-4 keeps such noise steps small while real gradients
    # (1e-3..1e-1) still take near-normalised steps.
    ap.add_argument("--eps", type=float, default=1e-4, help="AdamW eps")
    args = ap.parse_args()

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    import util_mindspore.misc as misc

    misc.init_distributed_mode(args)
    rank, world = misc.get_rank(), misc.get_world_size()
    if GLOBAL_BATCH % world:
        raise SystemExit(f"global batch {GLOBAL_BATCH} is not divisible by {world} ranks")

    per_rank = GLOBAL_BATCH // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    os.makedirs(args.out, exist_ok=True)
    suffix = f"rank{rank}" if misc.is_dist_avail_and_initialized() else "single"
    runs = [("params", True)]
    if world > 1:
        runs.append(("ctrl", False))  # negative control in the same launch: no gradient averaging
    for prefix, reduce in runs:
        model, losses = train(args, misc, rows, reduce and world > 1)
        state = {p.name: p.asnumpy() for p in model.get_parameters()}
        np.savez(os.path.join(args.out, f"{prefix}_{suffix}.npz"), **state)
        print(f"rank {rank}/{world} {prefix} losses {losses}", force=True)


def train(args, misc, rows, reduce):
    import util_mindspore.lr_decay as lrd
    from util_mindspore.optim import AdamW
    from engine_finetune_mindspore import Stepper
    from tests.helpers import tiny_vit

    # identical init on every rank: the same seeds right before the build
    ms.set_seed(0)
    np.random.seed(0)
    model = tiny_vit(drop_path_rate=0.0)
    groups = lrd.param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                  layer_decay=0.75)
    optimizer = AdamW(groups, lr=1e-2, eps=args.eps)
    reducer = misc.make_grad_reducer(optimizer.parameters) if reduce else None
    stepper = Stepper(model, optimizer, accum_iter=1, clip_grad=None, soft_targets=False, grad_reducer=reducer)
    model.set_train(True)

    data_rng = np.random.default_rng(1234)  # the same global batches on every rank
    losses = []
    for _ in range(args.steps):
        images = data_rng.standard_normal((GLOBAL_BATCH, 3, 32, 32)).astype(np.float32)
        labels = data_rng.integers(0, 3, size=GLOBAL_BATCH).astype(np.int32)
        loss = stepper(images[rows], labels[rows], 1e-2, True)
        losses.append(float(loss.asnumpy()))
    return model, losses


if __name__ == "__main__":
    main()
