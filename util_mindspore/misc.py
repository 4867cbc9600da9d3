# --------------------------------------------------------
# RETFound for MindSpore: logging meters, distributed helpers, checkpoint save/resume
# (the checkpoint functions live in checkpoint.py and are re-exported here).
# Derived from: rmaphoh/RETFound util/misc.py (itself from facebookresearch/mae util/misc.py,
# DeiT and BEiT). Written anew for MindSpore: numpy instead of torch for the meters,
# mindspore.communication (msrun) instead of torch.distributed, and .ckpt files written
# atomically with a CRC instead of torch.save.
# --------------------------------------------------------
import builtins
import datetime
import json
import os
import time
from collections import defaultdict, deque

import numpy as np

# ---------------------------------------------------------------------------
# Meters
# ---------------------------------------------------------------------------


class SmoothedValue:
    """Track a series of values: smoothed over a window, and the global average."""

    def __init__(self, window_size=20, fmt=None):
        if fmt is None:
            fmt = "{median:.4f} ({global_avg:.4f})"
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over ranks (the window is not synchronised, as in the original)."""
        if not is_dist_avail_and_initialized():
            return
        # The CPU AllReduce/AllGather kernels take float16/32 only: the total travels as a float32
        # (hi, lo) pair (~48 bits), the count as a float32 (exact below 2**24).
        hi = np.float32(self.total)
        lo = np.float32(self.total - float(hi))
        hi_sum, lo_sum, count = _all_reduce_sum(np.array([hi, lo, self.count], dtype=np.float32))
        self.count = int(round(float(count)))
        self.total = float(hi_sum) + float(lo_sum)

    @property
    def median(self):
        # PARITY: torch.median returns the lower of the two middle values for an even count, and
        # torch.tensor(floats) is float32 (util/misc.py SmoothedValue.median).
        d = np.asarray(list(self.deque))
        d = np.sort(d.astype(np.float32) if d.dtype.kind == 'f' else d)
        return d[(d.size - 1) // 2].item()

    @property
    def avg(self):
        return np.asarray(list(self.deque), dtype=np.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / self.count

    @property
    def max(self):
        return max(self.deque)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


def _scalar(v):
    """A Python number from a float/int, numpy scalar or 0-d/1-element MindSpore tensor."""
    if hasattr(v, 'asnumpy'):
        v = v.asnumpy()
    if isinstance(v, np.ndarray):
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    if not isinstance(v, (float, int)):
        raise TypeError(f'MetricLogger.update takes numbers or 1-element tensors, got {type(v).__name__}')
    return v


class MetricLogger:
    def __init__(self, delimiter="\t"):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for k, v in kwargs.items():
            if v is None:
                continue
            self.meters[k].update(_scalar(v))

    def __getattr__(self, attr):
        if attr in self.__dict__.get('meters', {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header=None):
        """Yield from ``iterable``, printing progress every ``print_freq`` steps and on the last:
        ``header  [ i/N]  eta: H:MM:SS  meters  time: t  data: t`` and then
        ``header Total time: H:MM:SS (s s / it)``. No 'max mem' column: that is CUDA-only in the
        original."""
        header = header or ''
        n = len(iterable)
        i = 0
        start_time = end = time.time()
        iter_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        space_fmt = ':' + str(len(str(n))) + 'd'
        log_msg = self.delimiter.join([header, '[{0' + space_fmt + '}/{1}]', 'eta: {eta}', '{meters}',
                                       'time: {time}', 'data: {data}'])
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == n - 1:
                eta_seconds = iter_time.global_avg * (n - i)
                eta_string = str(datetime.timedelta(seconds=int(eta_seconds)))
                print(log_msg.format(i, n, eta=eta_string, meters=str(self),
                                     time=str(iter_time), data=str(data_time)))
            i += 1
            end = time.time()
        total_time = time.time() - start_time
        total_time_str = str(datetime.timedelta(seconds=int(total_time)))
        print('{} Total time: {} ({:.4f} s / it)'.format(header, total_time_str, total_time / max(n, 1)))


def read_log(path):
    """The rows of log.txt (one JSON object per line) as dicts; [] when the file does not exist.
    Unreadable lines (a run killed mid-write) are skipped."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f'WARNING: skipping an unreadable line in {path}: {line[:80]!r}')
    return rows


# ---------------------------------------------------------------------------
# Distributed (msrun)
# ---------------------------------------------------------------------------
_initialized = False  # set by init_distributed_mode after mindspore.communication.init()


def setup_for_distributed(is_master):
    """Disable printing on non-master ranks (print(..., force=True) still prints); every
    printed line gets a time stamp."""
    builtin_print = getattr(builtins.print, '_retfound_original', builtins.print)

    def print(*args, **kwargs):  # noqa: A001
        force = kwargs.pop('force', False) or get_world_size() > 8
        if is_master or force:
            now = datetime.datetime.now().time()
            builtin_print('[{}] '.format(now), end='')
            builtin_print(*args, **kwargs)

    print._retfound_original = builtin_print
    builtins.print = print


def print_on_every_rank(*args, **kwargs):
    """print() that setup_for_distributed does not silence on the other ranks (print(..., force=True)
    of the original), also when it was never installed."""
    p = builtins.print
    if hasattr(p, '_retfound_original'):
        kwargs['force'] = True
    p(*args, **kwargs)


def is_dist_avail_and_initialized():
    return _initialized


def get_world_size():
    if not _initialized:
        return 1
    from mindspore.communication import get_group_size
    return get_group_size()


def get_rank():
    if not _initialized:
        return 0
    from mindspore.communication import get_rank as _get_rank
    return _get_rank()


def is_main_process():
    return get_rank() == 0


def _launched_by_msrun():
    # msrun (mindspore/parallel/cluster/process_entity/_api.py) exports MS_WORKER_NUM, MS_SCHED_HOST,
    # MS_SCHED_PORT, MS_ROLE (MS_WORKER / MS_SCHED), RANK_ID and DEVICE_ID (= local rank).
    return os.environ.get('MS_ROLE') in ('MS_WORKER', 'MS_SCHED') or (
        'MS_WORKER_NUM' in os.environ and 'MS_SCHED_HOST' in os.environ)


def init_distributed_mode(args):
    """Join the msrun cluster if launched by msrun, else single process.

    Sets args.distributed, args.rank, args.world_size, args.gpu (local device id). Call it after
    ``mindspore.set_device(...)``: init() picks the backend (mccl/nccl/hccl) from the device.
    """
    global _initialized
    if not _launched_by_msrun():
        world = os.environ.get('WORLD_SIZE', '1')
        if world.isdigit() and int(world) > 1:
            # torchrun / torch.distributed.launch (the original's launchers) set WORLD_SIZE; run
            # here, every process would train on the whole data as its own "rank 0", writing the
            # same files
            raise SystemExit(f'WORLD_SIZE={world} but this process was not started by msrun: launch data-parallel '
                             f'runs with msrun (e.g. msrun --worker_num={world} --local_worker_num={world} '
                             f'--join=True main_finetune_mindspore.py ...; README_MindSpore.md, 分布式训练), '
                             f'not torchrun')
        print('Not using distributed mode')
        setup_for_distributed(is_master=True)
        args.distributed = False
        return
    import mindspore as ms
    from mindspore.communication import init, get_rank as _get_rank, get_group_size
    init()
    _initialized = True
    args.distributed = True
    args.rank = _get_rank()
    args.world_size = get_group_size()
    args.gpu = int(os.environ.get('DEVICE_ID', '0'))
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=args.world_size)
    print('| distributed init (rank {}/{}), device {}'.format(args.rank, args.world_size, args.gpu), flush=True)
    setup_for_distributed(args.rank == 0)


def make_grad_reducer(parameters):
    """Mean of the gradients over ranks; apply it inside the train step (without it ranks diverge)."""
    from mindspore import nn
    return nn.DistributedGradReducer(parameters, mean=True, degree=get_world_size())


def _all_reduce_sum(array):
    import mindspore as ms
    from mindspore import ops
    out = ops.AllReduce()(ms.Tensor(np.ascontiguousarray(array)))
    return out.asnumpy()


def broadcast_parameters(cell, root=0):
    """Every rank's parameters of ``cell`` become rank ``root``'s (a no-op in one process).

    An AllReduce sum in which the other ranks contribute zeros: x + 0 + ... + 0 == x exactly, with
    the collective MindSpore already uses here on every backend (mccl, nccl, hccl)."""
    if get_world_size() <= 1:
        return
    import mindspore as ms
    mine = get_rank() == root
    for p in cell.get_parameters():
        value = p.asnumpy() if mine else np.zeros(p.shape, dtype=ms.dtype_to_nptype(p.dtype))
        p.set_data(ms.Tensor(_all_reduce_sum(value)))


def all_reduce_mean(x):
    """Mean of a Python number over ranks (x itself when not distributed)."""
    world_size = get_world_size()
    if world_size > 1:
        return float(_all_reduce_sum(np.array([x], dtype=np.float32))[0]) / world_size
    return x


def gather_predictions(true_labels, pred_softmax, num_samples=None):
    """Concatenate every rank's (labels, softmax) for --dist_eval.

    Assumes the evaluation shards are interleaved like torch's DistributedSampler without shuffle
    (rank r holds samples r, r+W, r+2W, ...; the last ones padded by repeating the first), which is
    what mindspore.dataset's num_shards/shard_id give. The result is in dataset order, cut back to
    ``num_samples`` (the unpadded dataset size) when given.
    """
    true_labels = np.asarray(true_labels)
    pred_softmax = np.asarray(pred_softmax, dtype=np.float32)
    world = get_world_size()
    if world > 1:
        import mindspore as ms
        from mindspore import ops
        n = true_labels.shape[0]
        # float32 throughout (the CPU kernels have no integer types); labels/counts are exact below 2**24
        counts = ops.AllGather()(ms.Tensor(np.array([n], dtype=np.float32))).asnumpy().astype(np.int64)
        m = int(counts.max())
        pad = m - n  # shards differ by at most one sample when the loader does not pad
        labels = np.concatenate([true_labels.astype(np.float32), np.full(pad, -1, np.float32)])
        probs = np.concatenate([pred_softmax, np.zeros((pad, pred_softmax.shape[1]), np.float32)])
        labels = ops.AllGather()(ms.Tensor(labels)).asnumpy().reshape(world, m)
        probs = ops.AllGather()(ms.Tensor(probs)).asnumpy().reshape(world, m, -1)
        order = [(i, r) for i in range(m) for r in range(world) if i < counts[r]]
        true_labels = np.array([labels[r, i] for i, r in order]).astype(np.int64)
        pred_softmax = np.stack([probs[r, i] for i, r in order])
    if num_samples is not None:
        true_labels, pred_softmax = true_labels[:num_samples], pred_softmax[:num_samples]
    return true_labels, pred_softmax


def gather_eval_loss(sample_losses, batch_size, num_samples=None):
    """--dist_eval: the evaluation loss one process would log for the whole set.

    One process logs the mean of its per-batch mean losses over the dataset in order (batches of
    ``batch_size``, the last one smaller). The shards' batches differ from those, so averaging the
    ranks' batch means gives another number; instead every rank's per-sample losses are gathered
    (like ``gather_predictions``: dataset order, padding dropped) and re-batched. The float64
    losses travel as float32 (hi, lo) pairs (~48 bits).
    """
    x = np.asarray(sample_losses, dtype=np.float64).reshape(-1)
    hi = x.astype(np.float32)
    lo = (x - hi.astype(np.float64)).astype(np.float32)
    _, pairs = gather_predictions(np.zeros(x.shape[0], np.int64), np.stack([hi, lo], axis=1), num_samples)
    x = pairs[:, 0].astype(np.float64) + pairs[:, 1].astype(np.float64)
    if x.size == 0:
        raise RuntimeError('gather_eval_loss: no samples were evaluated')
    meter = SmoothedValue()  # the same summation as the single-process loss meter
    for i in range(0, x.size, int(batch_size)):
        meter.update(float(x[i:i + int(batch_size)].mean()))
    return meter.global_avg


# ---------------------------------------------------------------------------
# Checkpoints (util_mindspore/checkpoint.py), under the original's names
# ---------------------------------------------------------------------------
from util_mindspore.checkpoint import (  # noqa: E402,F401
    OPTIMIZER_PREFIX, SCALER_PREFIX, CheckpointError, save_checkpoint_atomic, load_checkpoint_checked,
    save_model, read_checkpoint_args, read_checkpoint_meta, load_model, _optimizer_state)
