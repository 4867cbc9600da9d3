# --------------------------------------------------------
# RETFound for MindSpore: reading PyTorch/MindSpore checkpoints and loading them strictly.
# Derived from: rmaphoh/RETFound main_finetune.py (the "Load pre-trained weights" block:
# Hugging Face download, 'model'/'teacher' entry, key hygiene, head removal, pos-embed
# interpolation, head re-init) and util/misc.py load_model (--resume). Written anew.
#
# Differences from the original, on purpose:
# - .pth files are read WITHOUT torch and without running code from the file: a restricted
#   unpickler accepts tensors, containers and argparse.Namespace only.
# - The load is strict: missing/unexpected keys must lie in EXPECTED_MISSING /
#   EXPECTED_UNEXPECTED below and every shape must match (the original used strict=False and
#   could silently fine-tune from random weights).
# - The converted backbone is cached as a MindSpore .ckpt keyed by name + sha256 of the source.
# --------------------------------------------------------
import argparse
import collections
import hashlib
import json
import os
import re
import tempfile
import types

import numpy as np

from util_mindspore.checkpoint_io import WeightLoadError, read_checkpoint, _read_mindspore_ckpt
from util_mindspore.pos_embed import interpolate_pos_embed

__all__ = ['WeightLoadError', 'PUBLISHED_WEIGHTS', 'EXPECTED_MISSING', 'EXPECTED_UNEXPECTED',
           'read_checkpoint', 'resolve_finetune', 'load_pretrained', 'load_model_weights',
           'trunc_normal_numpy']

# The six checkpoints published by the RETFound authors on the Hugging Face Hub
# (repo YukunZhou/<NAME>, file <NAME>.pth). MAE ones keep weights under 'model',
# DINOv2 ones under 'teacher'.
PUBLISHED_WEIGHTS = ('RETFound_mae_natureCFP', 'RETFound_mae_natureOCT', 'RETFound_mae_meh',
                     'RETFound_mae_shanghai', 'RETFound_dinov2_meh', 'RETFound_dinov2_shanghai')

# Keys of the model that a pre-trained (not fine-tuned) backbone may lack: the new classifier
# and the global-pool norm, which pre-training does not have. They keep their fresh init.
EXPECTED_MISSING = ('head.weight', 'head.bias', 'fc_norm.weight', 'fc_norm.bias')
# Checkpoint keys that are dropped on purpose (exact names, or prefixes ending in '.' or '_'):
# the final norm (replaced by fc_norm under global_pool), the MAE decoder and mask token,
# DINOv2's mask token and projection heads. NOT allowed: register_tokens (a backbone trained
# with registers computes a different function without them), LayerScale into a model
# without it, or anything else.
EXPECTED_UNEXPECTED = ('norm.weight', 'norm.bias', 'mask_token', 'decoder_', 'dino_head.', 'ibot_head.')

# ---------------------------------------------------------------------------
# Source resolution (--finetune NAME|PATH)
# ---------------------------------------------------------------------------
_HF_ADVICE = ("run 'hf auth login' (or set HF_TOKEN) after accepting the terms on the repo page, "
              "set HF_ENDPOINT to use a mirror, or pass a local .pth path to --finetune")


_WEIGHT_FILE_SUFFIXES = ('.pth', '.pt', '.ckpt', '.safetensors', '.bin')


def _hub_name(finetune):
    """True for a --finetune value the original would fetch as YukunZhou/<NAME>/<NAME>.pth: a bare
    name (no folder, no weight-file suffix) that is not an existing file."""
    return (re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.-]{0,95}', finetune) is not None
            and not finetune.lower().endswith(_WEIGHT_FILE_SUFFIXES) and not os.path.exists(finetune))


def resolve_finetune(finetune):
    """NAME -> path in the Hugging Face cache (downloaded from YukunZhou/NAME if needed), as the
    original does for any name (the six of PUBLISHED_WEIGHTS, or a later release); an existing
    file -> itself. Returns (path, display_name)."""
    if finetune in PUBLISHED_WEIGHTS or _hub_name(finetune):
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hfe
        repo = f'YukunZhou/{finetune}'
        # a name the authors have not published (as far as this port knows) may also be a typo of
        # a file name: say both
        unknown = ('' if finetune in PUBLISHED_WEIGHTS else
                   f" ('{finetune}' is not one of the published checkpoints {', '.join(PUBLISHED_WEIGHTS)}, "
                   f"nor an existing file)")
        print(f'Downloading pre-trained weights from Hugging Face Hub: {repo}')
        try:
            return hf_hub_download(repo_id=repo, filename=f'{finetune}.pth'), finetune
        except hfe.GatedRepoError as e:
            raise WeightLoadError(f'repo {repo} is gated and this machine is not authorised: {_HF_ADVICE}') from e
        except hfe.RepositoryNotFoundError as e:
            raise WeightLoadError(f'repo {repo} was not found (or is private) at the Hub endpoint{unknown}: '
                                  f'{_HF_ADVICE}') from e
        except hfe.RemoteEntryNotFoundError as e:
            raise WeightLoadError(f'file {finetune}.pth was not found in repo {repo}: pass a local .pth '
                                  f'path to --finetune') from e
        except (hfe.LocalEntryNotFoundError, hfe.OfflineModeIsEnabled, ConnectionError, OSError) as e:
            raise WeightLoadError(f'could not download {repo}/{finetune}.pth and it is not in the local '
                                  f'Hugging Face cache (offline, no network, or HF_HUB_OFFLINE=1){unknown}: '
                                  f'{_HF_ADVICE} ({type(e).__name__}: {(str(e).splitlines() or [""])[0]})') from e
    if os.path.isfile(finetune):
        return finetune, os.path.splitext(os.path.basename(finetune))[0]
    raise WeightLoadError(f"--finetune '{finetune}' is neither a published RETFound checkpoint "
                          f"({', '.join(PUBLISHED_WEIGHTS)}) nor an existing .pth/.ckpt/.safetensors file")


# ---------------------------------------------------------------------------
# Entry selection and key hygiene
# ---------------------------------------------------------------------------
def _is_state_dict(d):
    return isinstance(d, dict) and len(d) > 0 and all(isinstance(v, np.ndarray) for v in d.values())


def _select_entry(checkpoint, model_name, path):
    if not isinstance(checkpoint, dict):
        raise WeightLoadError(f'{path}: holds a {type(checkpoint).__name__}, not a dict of tensors')
    if model_name == 'Dinov2':
        entry, sd = '(top level)', checkpoint  # the original uses the raw dict for Dinov2
    elif model_name == 'RETFound_dinov2' and isinstance(checkpoint.get('teacher'), dict):
        entry, sd = 'teacher', checkpoint['teacher']
    elif model_name != 'RETFound_dinov2' and isinstance(checkpoint.get('model'), dict):
        entry, sd = 'model', checkpoint['model']
    elif _is_state_dict(_without_metadata(checkpoint)):
        # a plain state dict (.ckpt, .safetensors, a converted file), minus scalar/str metadata
        entry, sd = '(top level)', _without_metadata(checkpoint)
    else:
        want = "'teacher'" if model_name == 'RETFound_dinov2' else "'model'"
        raise WeightLoadError(
            f"{path}: checkpoint has no {want} entry for --model {model_name} (keys: "
            f"{', '.join(map(str, list(checkpoint)[:20]))}). RETFound MAE checkpoints keep weights under "
            f"'model' (--model RETFound_mae), DINOv2 ones under 'teacher' (--model RETFound_dinov2)")
    if not _is_state_dict(sd):
        bad = [k for k, v in sd.items() if not isinstance(v, np.ndarray)][:10]
        hint = []
        if isinstance(sd.get('model'), dict):
            hint.append("its weights are under 'model' (an MAE checkpoint): use --model RETFound_mae")
        if isinstance(sd.get('teacher'), dict):
            hint.append("its weights are under 'teacher' (a RETFound DINOv2 checkpoint): use --model RETFound_dinov2")
        raise WeightLoadError(f"{path}: entry {entry} is not a state dict of tensors (non-tensor keys: "
                              f"{', '.join(map(str, bad))})"
                              + ('; ' + '; '.join(hint) if hint else
                                 "; --model Dinov2 takes a plain state dict (timm/DINOv2 backbone weights)"))
    return entry, sd


def _without_metadata(d):
    """Drop 0-d arrays, numbers and strings (e.g. 'epoch' in our own .ckpt) from a flat dict."""
    return collections.OrderedDict((k, v) for k, v in d.items()
                                   if not (isinstance(v, (str, int, float)) or
                                           (isinstance(v, np.ndarray) and v.ndim == 0)))


_BLOCK_CHUNK = re.compile(r'^blocks\.\d+\.(\d+)\.')


def _key_hygiene(sd):
    """The original's renames (main_finetune.py), plus DINOv2 block chunks blocks.C.N. -> blocks.N.
    (their inner index is already global; the original's strict=False would skip such keys)."""
    out = collections.OrderedDict()
    for k, v in sd.items():
        k = k.replace('backbone.', '').replace('mlp.w12.', 'mlp.fc1.').replace('mlp.w3.', 'mlp.fc2.')
        k = _BLOCK_CHUNK.sub(r'blocks.\1.', k)
        if np.issubdtype(v.dtype, np.floating):
            v = v.astype(np.float32, copy=False)
        out[k] = v
    return out


def _allowed_unexpected(key):
    return any(key == a or (a[-1] in '._' and key.startswith(a)) for a in EXPECTED_UNEXPECTED)


def _fmt_keys(keys, n=12):
    keys = sorted(keys)
    more = f' ... ({len(keys) - n} more)' if len(keys) > n else ''
    return ', '.join(keys[:n]) + more


def _param_shapes(model):
    return collections.OrderedDict((k, tuple(p.shape)) for k, p in model.parameters_dict().items())


def _account(param_shapes, sd, source, allow_missing, allow_unexpected):
    """Strict key/shape accounting of a state dict against the model's {name: shape}.

    Returns (missing, unexpected); raises WeightLoadError naming every offending key/shape when a
    missing key is not allowed, an unexpected key is not allowed, or any common shape differs."""
    missing = [k for k in param_shapes if k not in sd]
    unexpected = [k for k in sd if k not in param_shapes]
    bad_missing = [k for k in missing if not allow_missing(k)]
    bad_unexpected = [k for k in unexpected if not allow_unexpected(k)]
    bad_shape = [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {shape}'
                 for k, shape in param_shapes.items() if k in sd and tuple(sd[k].shape) != shape]
    if bad_missing or bad_unexpected or bad_shape:
        lines = [f'{source} does not match the model (a checkpoint of another architecture, '
                 f'depth or size?). Check --model, --model_arch, --input_size, --nb_classes, --global_pool/--cls_token:']
        if bad_shape:
            lines.append(f'  {len(bad_shape)} shape mismatches: ' + '; '.join(bad_shape[:8])
                         + (f' ... ({len(bad_shape) - 8} more)' if len(bad_shape) > 8 else ''))
        if bad_missing:
            lines.append(f'  {len(bad_missing)} model keys missing from the checkpoint: {_fmt_keys(bad_missing)}')
        if bad_unexpected:
            lines.append(f'  {len(bad_unexpected)} checkpoint keys the model does not have: '
                         f'{_fmt_keys(bad_unexpected)}')
        raise WeightLoadError('\n'.join(lines))
    return sorted(missing), sorted(unexpected)


def _prepare_for_model(model, sd):
    """The original's model-specific steps on a copy: drop a head of another shape, interpolate
    pos_embed. Returns (new dict, removed keys, interpolation or None)."""
    sd = collections.OrderedDict(sd)
    shapes = _param_shapes(model)
    removed = []
    for k in ('head.weight', 'head.bias'):
        if k in sd and tuple(sd[k].shape) != shapes.get(k):
            print(f'Removing key {k} from pretrained checkpoint')
            del sd[k]
            removed.append(k)
    interp = interpolate_pos_embed(model, sd)
    return sd, removed, interp


def _copy_into(model, sd):
    import mindspore as ms
    n = 0
    for k, p in model.parameters_dict().items():
        if k in sd:
            p.set_data(ms.Tensor(np.ascontiguousarray(sd[k]), dtype=p.dtype))
            n += 1
    return n


def trunc_normal_numpy(shape, std=1., mean=0., a=-2., b=2., rng=None):
    """timm trunc_normal_: N(mean, std) truncated to the ABSOLUTE interval [a, b] (by resampling)."""
    rng = np.random if rng is None else rng
    out = rng.normal(mean, std, size=shape)
    bad = (out < a) | (out > b)
    while bad.any():
        out[bad] = rng.normal(mean, std, size=int(bad.sum()))
        bad = (out < a) | (out > b)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------
# Cache of converted backbones
# ---------------------------------------------------------------------------
def _sha256(path, cache_dir):
    """sha256 of the source, memoised in cache_dir/sources.json by (realpath, size, mtime_ns),
    so a cache hit does not read the (1.2 GB) source at all."""
    st = os.stat(path)
    key = f'{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}'
    index_path = os.path.join(cache_dir, 'sources.json')
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            h.update(chunk)
    index[key] = h.hexdigest()
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix='.sources.', suffix='.json')
    with os.fdopen(fd, 'w') as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, index_path)
    return index[key]


def _save_cache(sd, entry, cache_path):
    """Atomic: save to a temporary .ckpt in the same folder, fsync, os.replace (ms.save_checkpoint
    deletes its target before writing, so it never writes to cache_path itself)."""
    import mindspore as ms
    d = os.path.dirname(cache_path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.' + os.path.basename(cache_path) + '.', suffix='.ckpt')
    os.close(fd)
    try:
        ms.save_checkpoint([{'name': k, 'data': ms.Tensor(v)} for k, v in sd.items()], tmp,
                           append_dict={'retfound_entry': entry}, crc_check=True)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, cache_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_backbone(finetune, model_name, cache_dir):
    """(state dict after entry selection + key hygiene, info dict), from the cache if possible."""
    path, name = resolve_finetune(finetune)
    info = {'source': path, 'name': name, 'cache': None, 'cache_hit': False}
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        sha = _sha256(path, cache_dir)
        tag = 'whole' if model_name == 'Dinov2' else ('teacher' if model_name == 'RETFound_dinov2' else 'model')
        cache_path = os.path.join(cache_dir, f'{name}-{tag}-{sha[:16]}.ckpt')
        info.update(sha256=sha, cache=cache_path)
        if os.path.isfile(cache_path):
            try:
                sd = _read_mindspore_ckpt(cache_path)
                info['entry'] = sd.pop('retfound_entry', '?')
                info['cache_hit'] = True
                return sd, info
            except WeightLoadError as e:
                print(f'Ignoring unreadable cache {cache_path} ({e}); converting again')
    checkpoint = read_checkpoint(path)
    info['entry'], sd = _select_entry(checkpoint, model_name, path)
    sd = _key_hygiene(sd)
    if cache_dir:
        _save_cache(sd, info['entry'], info['cache'])
    return sd, info


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------
def load_pretrained(model, finetune, model_name, cache_dir='./weights_cache', rng=None, verbose=True):
    """--finetune: load a pre-trained backbone into `model` like the original, but strictly.

    finetune: one of PUBLISHED_WEIGHTS (downloaded with huggingface_hub.hf_hub_download, which
    honours HF_TOKEN / `hf auth login`, HF_ENDPOINT, HF_HUB_OFFLINE and its cache) or a local
    .pth/.ckpt/.safetensors path. model_name: the --model value; it picks the entry ('teacher'
    for RETFound_dinov2, the whole dict for Dinov2, else 'model'). cache_dir: where converted
    backbones are kept ({name}-{entry}-{sha256[:16]}.ckpt; the cache holds the hygiene-applied
    dict BEFORE head removal and pos-embed interpolation, so it serves any --input_size and
    --nb_classes); None disables it.

    Returns a summary dict; raises WeightLoadError with an actionable message on any problem.
    """
    sd, info = _load_backbone(finetune, model_name, cache_dir)
    sd, removed, interp = _prepare_for_model(model, sd)  # on a copy: the cached dict stays generic
    missing, unexpected = _account(_param_shapes(model), sd, info['source'],
                                   allow_missing=lambda k: k in EXPECTED_MISSING,
                                   allow_unexpected=_allowed_unexpected)
    loaded = _copy_into(model, sd)
    params = model.parameters_dict()
    # PARITY: the head weight is re-initialised after loading, trunc_normal_(std=2e-5); the bias
    # keeps what was loaded (main_finetune.py)
    if 'head.weight' in params:
        import mindspore as ms
        w = params['head.weight']
        w.set_data(ms.Tensor(trunc_normal_numpy(tuple(w.shape), std=2e-5, rng=rng)))
    info.update(loaded=loaded, missing=missing, unexpected=unexpected, removed=removed,
                interpolated=None if interp is None else '%dx%d -> %dx%d' % (interp[0], interp[0],
                                                                            interp[1], interp[1]))
    if verbose:
        print(f"Loaded pre-trained checkpoint from: {info['source']}\n"
              f"  entry: {info['entry']}   cache: "
              + (f"{info['cache']} ({'hit' if info['cache_hit'] else 'written'})" if info['cache'] else 'off')
              + "\n"
              f"  loaded {loaded}/{len(params)} model tensors; head re-initialised (trunc_normal std 2e-5)\n"
              f"  missing (kept fresh init): {_fmt_keys(missing) or '-'}\n"
              f"  unexpected (dropped): {_fmt_keys(unexpected) or '-'}\n"
              f"  removed: {', '.join(removed) or '-'}   pos_embed: {info['interpolated'] or 'unchanged'}")
    return info


def _plain(x, depth=0):
    """Checkpoint metadata as plain Python: 0-d arrays -> scalars, namespaces -> dicts."""
    if depth > 100:
        raise WeightLoadError('checkpoint metadata nested more than 100 levels deep: not a checkpoint')
    if isinstance(x, (types.SimpleNamespace, argparse.Namespace)):
        return {k: _plain(v, depth + 1) for k, v in vars(x).items()}
    if isinstance(x, np.ndarray) and x.ndim == 0:
        return x.item()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {k: _plain(v, depth + 1) for k, v in x.items()}
    return x


def load_model_weights(model, path, extra_prefixes=()):
    """--resume / --eval: load a whole model (head included) strictly, without re-init.

    Accepts our .ckpt (model parameters plus scalar/str metadata such as 'epoch'; entries whose
    names start with one of extra_prefixes, e.g. optimizer moments, are returned, not loaded) and a
    PyTorch .pth fine-tuned by the original ({'model': ..., 'epoch', 'args', 'optimizer', ...} or a
    plain state dict). Returns the metadata: {'epoch', 'args' (dict), 'extra', 'format', ...}.
    """
    path = os.fspath(path)
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise WeightLoadError(f'{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict')
    meta = {'format': 'ckpt' if path.endswith('.ckpt') else 'pth', 'extra': {}}
    params = model.parameters_dict()
    if isinstance(checkpoint.get('model'), dict):
        sd = checkpoint['model']
        for k, v in checkpoint.items():
            if k in ('optimizer', 'scaler'):
                meta['has_' + k] = True  # torch optimizer state: not transferable to MindSpore
            elif k != 'model':
                meta[k] = _plain(v)
    else:
        sd = collections.OrderedDict()
        for k, v in checkpoint.items():
            if k in params:
                sd[k] = v
            elif any(k.startswith(p) for p in extra_prefixes):
                meta['extra'][k] = v
            elif isinstance(v, str) or (isinstance(v, np.ndarray) and v.ndim == 0):
                meta[k] = _plain(v)
            else:
                sd[k] = v  # an unknown tensor: reported as unexpected below
    if not _is_state_dict(sd):
        raise WeightLoadError(f"{path}: entry 'model' is not a state dict of tensors")
    sd = collections.OrderedDict((k, v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
                                 for k, v in sd.items())
    _account(_param_shapes(model), sd, path, allow_missing=lambda k: False, allow_unexpected=lambda k: False)
    loaded = _copy_into(model, sd)
    print(f"Resume checkpoint {path} ({loaded} tensors"
          + (f", epoch {meta['epoch']}" if 'epoch' in meta else '') + ')')
    return meta
