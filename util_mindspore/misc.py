# --------------------------------------------------------
# RETFound for MindSpore: logging meters, distributed helpers, checkpoint save/resume.
# Derived from: rmaphoh/RETFound util/misc.py (itself from facebookresearch/mae util/misc.py,
# DeiT and BEiT). Written anew for MindSpore: numpy instead of torch for the meters,
# mindspore.communication (msrun) instead of torch.distributed, and .ckpt files written
# atomically with a CRC instead of torch.save.
# --------------------------------------------------------
import builtins
import datetime
import glob
import json
import os
import time
import uuid
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
# Checkpoints
# ---------------------------------------------------------------------------
OPTIMIZER_PREFIX = 'optimizer.'   # optimizer state entries: 'optimizer.' + the state parameter's name
SCALER_PREFIX = 'scaler.'         # loss-scale state entries (scalars)
_CRC_TRAILER = b'crc_num'         # ms.save_checkpoint(crc_check=True) ends the file with it + 10 bytes
_RESERVED = ('epoch', 'args')


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt, or does not match the model/optimizer."""


def _temp_prefix(path):
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f'.{base}.partial-')


def _remove_stale_temps(path):
    """Remove temp files of earlier saves to ``path`` whose writer process is gone."""
    for tmp in glob.glob(glob.escape(_temp_prefix(path)) + '*'):
        try:
            pid = int(os.path.basename(tmp).rsplit('.partial-', 1)[1].split('-', 1)[0])
            os.kill(pid, 0)
            if pid != os.getpid():
                continue  # another live process is writing it
        except ProcessLookupError:
            pass
        except (ValueError, IndexError, PermissionError):
            continue
        try:
            os.remove(tmp)
        except OSError:
            pass


def _fsync_path(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (getattr(os, 'O_DIRECTORY', 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint_atomic(param_list_or_cell, path, append_dict=None):
    """``mindspore.save_checkpoint`` without ever leaving ``path`` missing or half-written.

    ms.save_checkpoint deletes its target before writing, so it writes to a temporary file in the
    same folder instead (with a CRC trailer so flipped bits are detected on load), which is
    fsynced and renamed over ``path`` with os.replace, then the folder is fsynced. A kill at any
    moment leaves either the previous or the new checkpoint at ``path``; leftover temp files
    (``.NAME.partial-PID-*``) are removed by the next save once their process is gone.
    """
    import mindspore as ms
    path = os.path.abspath(os.fspath(path))
    if not path.endswith('.ckpt'):
        raise ValueError(f'checkpoint path must end with .ckpt (mindspore.save_checkpoint appends it): {path}')
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temps(path)
    tmp = f'{_temp_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:8]}.ckpt'
    try:
        ms.save_checkpoint(param_list_or_cell, tmp, append_dict=append_dict, crc_check=True)
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp[:-len('.ckpt')] + '.tmp'):  # ours, and ms.save_checkpoint's own
            if os.path.exists(leftover):
                os.remove(leftover)
    _fsync_path(directory, directory=True)


def load_checkpoint_checked(path):
    """``mindspore.load_checkpoint(path, crc_check=True)`` with actionable errors.

    Returns {name: Parameter or str}. A file without the CRC trailer (truncated at a record
    boundary, or written without crc_check) is refused: its content cannot be verified.
    """
    import mindspore as ms
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        f.seek(max(0, size - 17))
        tail = f.read()
    if size == 0 or not tail.startswith(_CRC_TRAILER):
        raise CheckpointError(f'{path}: truncated or not written by this port ({size} bytes, no CRC trailer); '
                              f'use another checkpoint (e.g. checkpoint-best.ckpt) or retrain')
    try:
        return ms.load_checkpoint(path, crc_check=True)
    except Exception as e:  # MindSpore raises ValueError with a misleading "permission" message
        raise CheckpointError(f'{path}: corrupt checkpoint (CRC mismatch or unparsable content: '
                              f'{type(e).__name__}: {str(e)[:200]}); use another checkpoint or retrain') from e


def _args_json(args):
    return json.dumps(vars(args) if args is not None else {}, default=str, sort_keys=True)


def _model_params(model):
    return list(model.get_parameters())


def _optimizer_state(optimizer, model):
    """The optimizer's own parameters (moments, step): every parameter of the optimizer cell that
    is not a model parameter, by identity."""
    model_ids = {id(p) for p in model.get_parameters()}
    seen, state = set(), []
    for _, p in optimizer.parameters_and_names():
        if id(p) in model_ids or id(p) in seen:
            continue
        seen.add(id(p))
        state.append(p)
    return state


def _scaler_state(loss_scaler):
    if loss_scaler is None:
        return {}
    state = loss_scaler.state_dict() if hasattr(loss_scaler, 'state_dict') else dict(loss_scaler)
    return {SCALER_PREFIX + k: v for k, v in state.items()}


def save_model(args, epoch, model, model_without_ddp, optimizer, loss_scaler, mode, extra=None):
    """{output_dir}/{task}/checkpoint-best.ckpt (mode 'best': model, epoch, args) or
    checkpoint-latest.ckpt (model, optimizer state as 'optimizer.<name>', epoch, loss-scale state
    as 'scaler.<key>', args). ``args`` is stored as a JSON string; ``extra`` holds more scalars
    (e.g. max_score, best_epoch). Only the main process writes.

    Improvement over the original: the latest checkpoint keeps the optimizer state at the last
    epoch too, and every file is written atomically with a CRC."""
    if not is_main_process():
        return None
    del model  # the same cell as model_without_ddp in MindSpore (no DDP wrapper)
    task_dir = os.path.join(args.output_dir, args.task)
    os.makedirs(task_dir, exist_ok=True)
    if mode not in ('best', 'latest'):
        raise ValueError(f"save_model mode must be 'best' or 'latest', got {mode!r}")
    path = os.path.join(task_dir, f'checkpoint-{mode}.ckpt')
    entries = [{'name': p.name, 'data': p} for p in _model_params(model_without_ddp)]
    meta = {'epoch': int(epoch), 'args': _args_json(args)}
    if mode == 'latest':
        if optimizer is not None:
            entries += [{'name': OPTIMIZER_PREFIX + p.name, 'data': p}
                        for p in _optimizer_state(optimizer, model_without_ddp)]
        meta.update(_scaler_state(loss_scaler))
    for k, v in (extra or {}).items():
        if k in meta or k.startswith((OPTIMIZER_PREFIX, SCALER_PREFIX)):
            raise ValueError(f'extra key {k!r} collides with a reserved checkpoint entry')
        meta[k] = v
    names = [e['name'] for e in entries]
    clash = sorted(set(names) & set(meta)) or sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f'checkpoint entry names are not unique: {clash}')
    save_checkpoint_atomic(entries, path, append_dict=meta)
    return path


def _check_and_copy(params, ckpt, path, what, prefix=''):
    """Copy ckpt[prefix + p.name] into every p; all must exist with equal shapes."""
    missing, mismatched = [], []
    for p in params:
        key = prefix + p.name
        if key not in ckpt or isinstance(ckpt[key], str):
            missing.append(key)
        elif tuple(ckpt[key].shape) != tuple(p.shape):
            mismatched.append(f'{key}: checkpoint {tuple(ckpt[key].shape)} vs {what} {tuple(p.shape)}')
    if missing or mismatched:
        lines = [f'{path} does not match the {what}:']
        if missing:
            lines.append(f'  missing ({len(missing)}): {missing[:20]}' + (' ...' if len(missing) > 20 else ''))
        if mismatched:
            lines.append(f'  shape mismatch ({len(mismatched)}): ' + '; '.join(mismatched[:20]))
        lines.append('  check --model/--nb_classes/--input_size against the run that wrote it')
        raise CheckpointError('\n'.join(lines))
    for p in params:
        value = ckpt[prefix + p.name]
        p.set_data(value.astype(p.dtype) if value.dtype != p.dtype else value)


def _meta_value(v):
    if isinstance(v, str):
        return v
    return v.asnumpy().item()


def read_checkpoint_args(path):
    """The training args stored in a checkpoint, as a dict (None when it has none).
    Reads our .ckpt ('args' JSON string) and the original's .pth (pickled Namespace)."""
    path = os.fspath(path)
    if path.endswith('.ckpt'):
        ckpt = load_checkpoint_checked(path)
        if 'args' not in ckpt:
            return None
        return json.loads(ckpt['args'])
    from util_mindspore.weight_converter import read_checkpoint
    saved = read_checkpoint(path).get('args')
    if saved is None:
        return None
    return dict(vars(saved)) if hasattr(saved, '__dict__') else dict(saved)


def load_model(args, model_without_ddp, optimizer, loss_scaler):
    """Resume from args.resume (a checkpoint written by save_model).

    Loads every model parameter (strict: present, equal shape; extra model-like entries are
    an error), and, unless args.eval, the optimizer state and loss-scale state when present,
    setting args.start_epoch = epoch + 1. Returns the metadata dict (epoch, args, extra scalars
    such as max_score/best_epoch) or None when args.resume is empty.
    """
    if not getattr(args, 'resume', ''):
        return None
    path = args.resume
    if not path.endswith('.ckpt'):
        raise CheckpointError(f'--resume {path}: full-state resume needs a .ckpt written by this port; '
                              f'a PyTorch .pth has no MindSpore optimizer state (use --finetune to start from its weights)')
    ckpt = load_checkpoint_checked(path)
    model_params = _model_params(model_without_ddp)
    _check_and_copy(model_params, ckpt, path, 'model')
    model_names = {p.name for p in model_params}
    meta = {k: _meta_value(v) for k, v in ckpt.items()
            if k not in model_names and not k.startswith(OPTIMIZER_PREFIX)
            and (isinstance(v, str) or len(v.shape) == 0)}
    unexpected = sorted(k for k in ckpt if k not in model_names and k not in meta
                        and not k.startswith(OPTIMIZER_PREFIX))
    if unexpected:
        raise CheckpointError(f'{path} has tensors that are not parameters of the model ({len(unexpected)}): '
                              f'{unexpected[:20]}; check --model/--global_pool against the run that wrote it')
    if 'args' in meta:
        meta['args'] = json.loads(meta['args'])
    print(f'Resume checkpoint {path}')
    has_optimizer = any(k.startswith(OPTIMIZER_PREFIX) for k in ckpt)
    if has_optimizer and 'epoch' in meta and not getattr(args, 'eval', False):
        if optimizer is not None:
            state = _optimizer_state(optimizer, model_without_ddp)
            _check_and_copy(state, ckpt, path, 'optimizer state', prefix=OPTIMIZER_PREFIX)
            extra = sorted(set(k for k in ckpt if k.startswith(OPTIMIZER_PREFIX))
                           - {OPTIMIZER_PREFIX + p.name for p in state})
            if extra:
                raise CheckpointError(f'{path} has optimizer entries this optimizer does not have: {extra[:20]}')
        args.start_epoch = int(meta['epoch']) + 1
        scaler = {k[len(SCALER_PREFIX):]: v for k, v in meta.items() if k.startswith(SCALER_PREFIX)}
        if scaler and loss_scaler is not None:
            loss_scaler.load_state_dict(scaler)
        print('With optim & sched!')
    return meta
