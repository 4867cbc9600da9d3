# --------------------------------------------------------
# RETFound for MindSpore: train_one_epoch and evaluate.
# Derived from: rmaphoh/RETFound engine_finetune.py (MAE engine_finetune.py). Written anew:
# the forward/backward/update is one value_and_grad step compiled as a GRAPH_MODE Cell; the
# logging, metrics and LR bookkeeping stay in plain Python outside it (mindcv's pattern).
# --------------------------------------------------------
import math
import os
import sys
from typing import Iterable, Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

import util_mindspore.lr_sched as lr_sched
from util_mindspore import cpu_kernels
import util_mindspore.misc as misc
from util_mindspore.metrics import compute_metrics, write_metrics_csv, save_confusion_matrix, save_roc_curves
from util_mindspore.optim import clip_grad_norm, all_finite


class NetWithLoss(nn.Cell):
    """Model + criterion. The original's criterion is torch.nn.CrossEntropyLoss() in every case;
    with Mixup/CutMix its targets are soft probabilities, which torch's CE accepts (soft-target CE).

    # PARITY: --smoothing acts only through Mixup's soft targets; the hard-label CE has no
    # label smoothing (main_finetune.py __main__: criterion = torch.nn.CrossEntropyLoss()).
    """

    def __init__(self, model, soft_targets=False, loss_scaler=None):
        super().__init__(auto_prefix=False)
        self.model = model
        self.soft_targets = soft_targets
        self.scaling = loss_scaler is not None
        self.loss_scaler = loss_scaler if loss_scaler is not None else nn.Identity()
        # MindSpore defaults spelled out (equal to torch's here).
        self.ce = nn.CrossEntropyLoss(weight=None, ignore_index=-100, reduction='mean', label_smoothing=0.0)

    def construct(self, images, targets):
        logits = ops.cast(self.model(images), ms.float32)  # the loss in fp32 under --amp_level too
        if self.soft_targets:
            loss = ops.mean(ops.sum(-targets * ops.log_softmax(logits, axis=-1), dim=-1))
        else:
            loss = self.ce(logits, targets)
        if self.scaling:
            loss = loss * self.loss_scaler.scale  # fp16: gradients of the scaled loss
        return loss


class _StepBase(nn.Cell):
    def __init__(self, net_with_loss, optimizer, clip_grad=None, grad_reducer=None):
        super().__init__(auto_prefix=False)
        self.net_with_loss = net_with_loss
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.value_and_grad = ms.value_and_grad(net_with_loss, None, self.weights)
        self.clip = clip_grad is not None
        self.max_norm = float(clip_grad) if clip_grad is not None else 1.0
        self.reduce = grad_reducer is not None
        self.grad_reducer = grad_reducer if grad_reducer is not None else nn.Identity()
        self.scaling = net_with_loss.scaling
        self.loss_scaler = net_with_loss.loss_scaler
        self.hyper_map = ops.HyperMap()

    def _unscale(self, loss, grads):
        if self.scaling:
            inv = 1.0 / self.loss_scaler.scale
            return loss * inv, self.hyper_map(ops.partial(_mul, inv), grads)
        return loss, grads

    def _update(self, grads, lr):
        if self.reduce:
            grads = self.grad_reducer(grads)  # data parallel: mean over ranks
        if self.clip:
            grads, _ = clip_grad_norm(grads, self.max_norm)
        if self.scaling:
            finite = all_finite(grads)  # GradScaler: skip the step on overflow, then adjust the scale
            done = self.optimizer.apply_if(grads, lr, finite)
            return ops.depend(done, self.loss_scaler(finite))
        return self.optimizer(grads, lr)


class TrainStep(_StepBase):
    """accum_iter == 1: forward, backward, [all-reduce], [clip], AdamW in one graph."""

    def construct(self, images, targets, lr):
        loss, grads = self.value_and_grad(images, targets)
        loss, grads = self._unscale(loss, grads)
        loss = ops.depend(loss, self._update(grads, lr))
        return loss


class AccumStep(_StepBase):
    """accum_iter > 1: micro-step graph adds grads/accum_iter into accumulators; the apply graph
    (no activations, so a small memory pool) clips and updates on the accumulation boundary."""

    def __init__(self, net_with_loss, optimizer, accum_iter, clip_grad=None, grad_reducer=None):
        super().__init__(net_with_loss, optimizer, clip_grad, grad_reducer)
        self.accum = self.weights.clone(prefix="accum_grad", init="zeros")
        self.inv_accum = Tensor(1.0 / accum_iter, ms.float32)

    def construct(self, images, targets):
        loss, grads = self.value_and_grad(images, targets)
        loss, grads = self._unscale(loss, grads)
        # the original divides the loss by accum_iter before backward: the same gradients
        done = self.hyper_map(ops.partial(_accumulate, self.inv_accum), self.accum, grads)
        return ops.depend(loss, done)


class ApplyAccumulated(nn.Cell):
    def __init__(self, accum_step):
        super().__init__(auto_prefix=False)
        self.step = accum_step
        self.hyper_map = ops.HyperMap()

    def construct(self, lr):
        grads = tuple(self.step.accum)
        done = self.step._update(grads, lr)
        return ops.depend(self.hyper_map(_zero, self.step.accum), done)


_accumulate = ops.MultitypeFuncGraph("accumulate")


@_accumulate.register("Tensor", "Tensor", "Tensor")
def _accumulate_one(scale, acc, grad):
    return ops.assign_add(acc, grad * scale)


_mul = ops.MultitypeFuncGraph("mul")


@_mul.register("Tensor", "Tensor")
def _mul_one(scale, grad):
    return grad * ops.cast(scale, grad.dtype)


_zero = ops.MultitypeFuncGraph("zero")


@_zero.register("Tensor")
def _zero_one(acc):
    return ops.assign(acc, ops.zeros_like(acc))


class Stepper:
    """What train_one_epoch drives: ``stepper(images, targets, lr, update) -> loss``.

    Built once in main and reused across epochs (every new graph costs a compile)."""

    def __init__(self, model, optimizer, accum_iter=1, clip_grad=None, soft_targets=False, grad_reducer=None,
                 loss_scaler=None, jit=False):
        self.model = model
        self.optimizer = optimizer
        self.accum_iter = int(accum_iter)
        self.loss_scaler = loss_scaler
        self.clip_grad = clip_grad
        net = NetWithLoss(model, soft_targets=soft_targets, loss_scaler=loss_scaler)
        if self.accum_iter == 1:
            self.train_step = TrainStep(net, optimizer, clip_grad, grad_reducer)
            self.micro_step = self.apply_step = None
        else:
            self.micro_step = AccumStep(net, optimizer, self.accum_iter, clip_grad, grad_reducer)
            self.apply_step = ApplyAccumulated(self.micro_step)
            self.train_step = None
        self.soft_targets = soft_targets
        if jit:
            # --mode jit: PYNATIVE context, the step cells compiled with the @ms.jit decorator
            # (GRAPH_MODE, the default, compiles them as whole-graph Cells and ran steadier here)
            for cell in (self.train_step, self.micro_step, self.apply_step):
                if cell is not None:
                    cell.construct = ms.jit(cell.construct)

    def reset_accumulation(self):
        """optimizer.zero_grad() at the start of each epoch in the original."""
        if self.micro_step is not None:
            for acc in self.micro_step.accum:
                acc.set_data(ops.zeros_like(acc))

    def __call__(self, images, targets, lr, update=True):
        images = Tensor(np.ascontiguousarray(images, dtype=np.float32))
        targets = Tensor(np.ascontiguousarray(targets, dtype=np.float32 if self.soft_targets else np.int32))
        lr_t = Tensor(lr, ms.float32)
        if self.train_step is not None:
            return self.train_step(images, targets, lr_t)
        loss = self.micro_step(images, targets)
        if update:
            self.apply_step(lr_t)
        return loss


def train_one_epoch(model, criterion, data_loader: Iterable, optimizer, device, epoch: int, loss_scaler=None,
                    max_norm: float = 0, mixup_fn: Optional[object] = None, log_writer=None, args=None,
                    stepper: Stepper = None):
    """Train the model for one epoch (the original's arguments, plus the compiled ``stepper``).

    The loss and the gradient clipping are compiled into ``stepper`` (Stepper(model, optimizer,
    accum_iter, clip_grad, soft_targets=Mixup on)): cross-entropy, soft-target cross-entropy under
    Mixup/CutMix, as the original's criterion computes. ``criterion`` must therefore be None (a
    loss passed here would be ignored, so it is refused) and ``max_norm`` 0/None or the stepper's."""
    if stepper is None:
        raise TypeError('train_one_epoch needs stepper=Stepper(model, optimizer, accum_iter=..., clip_grad=..., '
                        'soft_targets=mixup_fn is not None): the compiled train step, built once and reused '
                        '(see main_finetune_mindspore.py)')
    if criterion is not None:
        raise ValueError(f'train_one_epoch: criterion={type(criterion).__name__} would be ignored: the loss is '
                         'compiled into the Stepper (cross-entropy; soft-target cross-entropy with Mixup/CutMix, '
                         'as the original). Pass criterion=None; another loss needs another NetWithLoss')
    if max_norm and max_norm != stepper.clip_grad:
        raise ValueError(f'train_one_epoch: max_norm={max_norm} differs from the Stepper\'s clip_grad='
                         f'{stepper.clip_grad}; gradient clipping is compiled into the Stepper')
    model.set_train(True)
    metric_logger = misc.MetricLogger(delimiter="  ")
    metric_logger.add_meter('lr', misc.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = f'Epoch: [{epoch}]'
    print_freq, accum_iter = 20, args.accum_iter
    num_steps = len(data_loader)
    stepper.reset_accumulation()
    max_scale = max(optimizer.scale_values)

    if log_writer:
        print(f'log_dir: {log_writer.log_dir}')

    for data_iter_step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        # PARITY: the LR changes only on accumulation boundaries (engine_finetune.py train_one_epoch)
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / num_steps + epoch, args)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        update = (data_iter_step + 1) % accum_iter == 0
        loss = stepper(samples, targets, optimizer.current_lr, update)
        loss_value = float(loss.asnumpy())
        if not math.isfinite(loss_value):
            # The MAE original stops here; RETFound lost the check. Checkpoints on disk are untouched.
            # every rank says why it stops (msrun then stops the others)
            misc.print_on_every_rank(f"Loss is {loss_value} at epoch {epoch}, step {data_iter_step}: stopping "
                                     f"training. Lower the learning rate (--blr/--lr), set --clip_grad, or check "
                                     f"the input data.")
            sys.exit(1)

        metric_logger.update(loss=loss_value)
        max_lr = optimizer.current_lr * max_scale
        metric_logger.update(lr=max_lr)

        loss_value_reduce = misc.all_reduce_mean(loss_value)
        if log_writer is not None and (data_iter_step + 1) % accum_iter == 0:
            # epoch_1000x as the x-axis calibrates curves across batch sizes (as the original)
            epoch_1000x = int((data_iter_step / num_steps + epoch) * 1000)
            log_writer.add_scalar('loss/train', loss_value_reduce, epoch_1000x)
            log_writer.add_scalar('lr', max_lr, epoch_1000x)

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


def _softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def _cross_entropy(logits, labels, reduce=True):
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    per_sample = -logp[np.arange(len(labels)), labels]
    return float(per_sample.mean()) if reduce else per_sample


def predict(model, data_loader, batch_size, log_header='', print_freq=10, metric_logger=None,
            return_sample_losses=False):
    """Run the model over a loader in eval mode; returns (labels, softmax, per-batch losses).

    The last, smaller batch is padded to ``batch_size`` so the graph compiles once.
    ``return_sample_losses``: also return every sample's loss (a 4th value)."""
    model.set_train(False)
    labels, probs, sample_losses = [], [], []
    metric_logger = metric_logger or misc.MetricLogger(delimiter="  ")
    # no weight changes in here: --cpu_bf16 Linear layers pack their bf16 weights once, fp32 ones are
    # packed in place and restored on the way out (cpu_kernels.frozen_weights)
    try:
        batches = len(data_loader)
    except (TypeError, NotImplementedError):
        batches = None
    with cpu_kernels.frozen_weights(model, batches=batches) as frozen:
        for images, target in metric_logger.log_every(data_loader, print_freq, log_header):
            n = images.shape[0]
            if n < batch_size:
                pad = np.zeros((batch_size - n,) + images.shape[1:], dtype=np.float32)
                images = np.concatenate([images, pad], axis=0)
            batch = Tensor(np.ascontiguousarray(images, dtype=np.float32))
            logits = model(batch).asnumpy()[:n]
            if not frozen.verify():  # a packed weight was read by something else: weights restored, again
                logits = model(batch).asnumpy()[:n]
            target = np.asarray(target).astype(np.int64)
            sample_losses.append(_cross_entropy(logits, target, reduce=False))
            metric_logger.update(loss=float(sample_losses[-1].mean()))
            labels.append(target)
            probs.append(_softmax(logits.astype(np.float32)))
    if not labels:
        raise RuntimeError(f"{log_header} the data loader produced no batches")
    if return_sample_losses:
        return np.concatenate(labels), np.concatenate(probs), metric_logger, np.concatenate(sample_losses)
    return np.concatenate(labels), np.concatenate(probs), metric_logger


def evaluate(data_loader, model, device, args, epoch, mode, num_class, log_writer, class_names=None):
    """Evaluate: the original's ten numbers, metrics_{mode}.csv, confusion matrix on test."""
    task_dir = os.path.join(args.output_dir, args.task)
    os.makedirs(task_dir, exist_ok=True)
    true_labels, pred_softmax, metric_logger, sample_losses = predict(model, data_loader, args.batch_size,
                                                                      f'{mode}:', return_sample_losses=True)
    # --dist_eval: every rank predicted its shard; gather them back in dataset order, padding dropped
    # (the original computes each rank's metrics on its own shard only). Without --dist_eval every
    # rank holds the whole set already: gathering would duplicate samples.
    sharded = getattr(data_loader, 'num_shards', 1) > 1
    if sharded:
        true_labels, pred_softmax = misc.gather_predictions(true_labels, pred_softmax, len(data_loader.dataset))
    m = compute_metrics(true_labels, pred_softmax, num_class)
    score = m['score']
    if log_writer:
        for name in ['accuracy', 'f1', 'roc_auc', 'hamming', 'jaccard', 'precision', 'recall',
                     'average_precision', 'kappa', 'score']:
            log_writer.add_scalar(f'perf/{name}', m[name], epoch)

    metric_logger.synchronize_between_processes()
    val_loss = metric_logger.meters["loss"].global_avg
    if sharded:  # the loss one process logs over the whole set, not the mean of the shards' batch means
        val_loss = misc.gather_eval_loss(sample_losses, args.batch_size, len(data_loader.dataset))
    print(f'val loss: {val_loss}')
    print(f"Accuracy: {m['accuracy']:.4f}, F1 Score: {m['f1']:.4f}, ROC AUC: {m['roc_auc']:.4f}, "
          f"Hamming Loss: {m['hamming']:.4f},\n Jaccard Score: {m['jaccard']:.4f}, "
          f"Precision: {m['precision']:.4f}, Recall: {m['recall']:.4f},\n"
          f" Average Precision: {m['average_precision']:.4f}, Kappa: {m['kappa']:.4f}, Score: {score:.4f}")

    if misc.is_main_process():
        write_metrics_csv(os.path.join(task_dir, f'metrics_{mode}.csv'), val_loss, m)
        if mode == 'test':
            pred_labels = pred_softmax.argmax(axis=1)
            save_confusion_matrix(true_labels, pred_labels, os.path.join(task_dir, 'confusion_matrix_test.jpg'),
                                  class_names=class_names)
            save_roc_curves(true_labels, pred_softmax, os.path.join(task_dir, 'roc_curves_test.png'),
                            class_names=class_names)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats['loss'] = val_loss
    return stats, score
