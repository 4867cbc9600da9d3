# --------------------------------------------------------
# RETFound for MindSpore: crash-safe checkpoint save / resume.
# Derived from: rmaphoh/RETFound util/misc.py save_model / load_model. Written anew:
# atomic writes (temporary file, fsync, os.replace, directory fsync) with CRC, strict loads.
# The public names are re-exported by util_mindspore.misc, as in the original's layout.
# --------------------------------------------------------
import glob
import json
import os
import uuid


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
    from util_mindspore import cpu_kernels
    if cpu_kernels.packed_in_place():
        # inside cpu_kernels.frozen_weights(model) (evaluation) fp32 Linear weights are reordered in
        # place into oneDNN's packed layout: saved now they would be scrambled
        raise RuntimeError('refusing to save a checkpoint while Linear weights are packed in place for '
                           'evaluation: save after the evaluation block (cpu_kernels.frozen_weights) has ended')
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


def load_checkpoint_checked(path, names=None):
    """``mindspore.load_checkpoint(path, crc_check=True)`` with actionable errors.

    Returns {name: Parameter or str}; only the entries in ``names`` when given. A file without the
    CRC trailer (truncated at a record boundary, or written without crc_check) is refused: its
    content cannot be verified.
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
        if names is None:
            return ms.load_checkpoint(path, crc_check=True)
        wanted = set(names)
        return ms.load_checkpoint(path, crc_check=True, choice_func=lambda name: name in wanted)
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
    from util_mindspore.misc import is_main_process  # misc re-exports this module: import lazily
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


def read_checkpoint_meta(path, keys=('epoch', 'max_score')):
    """The scalar entries ``keys`` of a checkpoint written by save_model ({} when the file is
    missing or unreadable), without loading its tensors."""
    if not os.path.isfile(path):
        return {}
    try:
        ckpt = load_checkpoint_checked(path, names=keys)
    except CheckpointError:
        return {}
    return {k: _meta_value(v) for k, v in ckpt.items()}


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
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict')
    saved = checkpoint.get('args')
    if saved is None:
        return None
    if hasattr(saved, '__dict__'):
        saved = vars(saved)
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise CheckpointError(f"{path}: its 'args' entry is a {type(saved).__name__}, not the original's "
                              f"argparse.Namespace")
    return dict(saved)


def _load_original_checkpoint(args, model_without_ddp, path):
    """--resume with a checkpoint the PyTorch original wrote (.pth): its model weights, strictly.

    The original's checkpoint-best.pth holds {'model', 'epoch', 'args'} and no optimizer state, so
    its own `--resume checkpoint-best.pth` trains again from args.start_epoch with fresh AdamW
    moments; so does this. A .pth that does carry a torch optimizer state (and an epoch) continues
    at epoch + 1 as the original would, but the torch state itself is not transferable: AdamW's
    moments start from zero (said in a warning)."""
    from util_mindspore.weight_converter import load_model_weights, WeightLoadError
    try:
        meta = load_model_weights(model_without_ddp, path)
    except WeightLoadError as e:
        raise CheckpointError(str(e)) from None
    if getattr(args, 'eval', False):
        return meta
    if meta.get('has_optimizer') and 'epoch' in meta:
        args.start_epoch = int(meta['epoch']) + 1
        print(f"WARNING: {path} holds a torch optimizer state, which MindSpore cannot use: training continues "
              f"at epoch {args.start_epoch} as the original would, but AdamW's moments start from zero")
    else:
        print(f"{path} is the original's checkpoint (model weights, no optimizer state): training starts at "
              f"epoch {args.start_epoch} from these weights, as the original does with it")
    return meta


def load_model(args, model_without_ddp, optimizer, loss_scaler):
    """Resume from args.resume (a checkpoint written by save_model, or the original's .pth: see
    _load_original_checkpoint).

    Loads every model parameter (strict: present, equal shape; extra model-like entries are
    an error), and, unless args.eval, the optimizer state and loss-scale state when present,
    setting args.start_epoch = epoch + 1. Returns the metadata dict (epoch, args, extra scalars
    such as max_score/best_epoch) or None when args.resume is empty.
    """
    if not getattr(args, 'resume', ''):
        return None
    path = args.resume
    if not path.endswith('.ckpt'):
        return _load_original_checkpoint(args, model_without_ddp, path)
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
