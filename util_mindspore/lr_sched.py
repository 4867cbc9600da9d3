# --------------------------------------------------------
# Half-cycle cosine learning-rate schedule with linear warmup.
# Derived from: rmaphoh/RETFound util/lr_sched.py. Written anew.
# --------------------------------------------------------
import math


def lr_at(epoch, args):
    """The schedule as a pure function of the (fractional) epoch."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * \
        (1. + math.cos(math.pi * (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)))


def adjust_learning_rate(optimizer, epoch, args):
    """Set the base LR of ``optimizer`` for the fractional ``epoch``; returns that LR.

    Each group's effective LR is ``lr * lr_scale`` (applied inside the compiled step).
    """
    lr = lr_at(epoch, args)
    optimizer.set_lr(lr)
    return lr
