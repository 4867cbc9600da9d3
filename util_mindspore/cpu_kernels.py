# --------------------------------------------------------
# RETFound for MindSpore: fused fp32 CPU kernels (LayerNorm, bias add, bias + GELU, softmax,
# attention head split, Linear and the attention core on oneDNN, drop path, the AdamW step) as
# MindSpore AOT custom operators with their own backward kernels.
# Written for this port; the C++ source is util_mindspore/csrc/retfound_cpu_kernels.cc.
#
# Why: on CPU, MindSpore 2.10's LayerNormGrad, BiasAddGrad, Erf, the softmax-backward ReduceSum
# and the StridedSlice that splits q/k/v take ~3 s of a 7.7 s ViT-B/16 batch-8 train step
# (profile in docs/performance.md); the same arithmetic in vectorised, threaded C++ takes a
# few hundred ms and keeps fewer intermediates alive in GRAPH_MODE.
#
# The library is compiled on first use with the system C++ compiler (g++ or $CXX) into a cache
# keyed by the source, the flags, the compiler and the CPU (so a shared home directory on a
# cluster with mixed CPUs never loads a binary built for another CPU's instruction set).
# Without a compiler, or with RETFOUND_CPU_KERNELS=0, or off CPU, or for non-fp32 tensors, the
# model uses MindSpore's own operators: same results to rounding, only slower.
# --------------------------------------------------------
import contextlib
import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings

import numpy as np
import mindspore as ms
from mindspore import ops, Tensor

__all__ = ['enabled', 'library_path', 'status', 'layer_norm_op', 'bias_add_op', 'bias_gelu_op',
           'gelu_op', 'softmax_op', 'qkv_split_op', 'attention_op', 'attention_recompute_op', 'linear_op', 'row_scale_op', 'add_row_scale_op', 'adamw_op', 'linear_available', 'set_bf16_matmul',
           'bf16_matmul', 'save_bf16_inputs', 'cpu_has_bf16', 'frozen_weights', 'weight_cache_stats', 'pool_spin_us',
           'packed_in_place', 'in_place_stats', 'FrozenWeights', 'ENV_SWITCH', 'ENV_CACHE', 'ENV_SPIN', 'ENV_PACK']

ENV_SWITCH = 'RETFOUND_CPU_KERNELS'   # '0' / 'off' / 'false': never use the fused kernels
ENV_CACHE = 'RETFOUND_KERNEL_CACHE'   # where the compiled library is kept
ENV_SPIN = 'RETFOUND_KERNEL_SPIN_US'  # how long idle worker threads poll before blocking (default 300)
ENV_PACK = 'RETFOUND_PACK_IN_PLACE'   # '0': fp32 evaluation keeps dnnl_sgemm (see frozen_weights)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'retfound_cpu_kernels.cc')
# -ffp-contract=off: no fused multiply-adds the source did not write (g++ in ISO C++ mode already
# does not contract; clang would), so the AdamW kernel rounds exactly as the composed update does.
# -fno-math-errno: std::sqrt may then be vectorised (vsqrtps, correctly rounded like sqrtf); with
# errno kept, the AdamW loop called sqrtf per element and ran 3.4x slower (0.14 vs 0.042 s, 86M).
FLAGS = ('-std=c++17', '-O3', '-march=native', '-ffp-contract=off', '-fno-math-errno', '-fopenmp-simd', '-pthread',
         '-shared', '-fPIC', '-ldl')
LIB_NAME = 'libretfound_cpu_kernels.so'

_lock = threading.Lock()
_state = {'path': None, 'error': None, 'tried': False, 'gemm': None, 'bf16_matmul': False, 'lib': None}


def _env_off(name):
    return os.environ.get(name, '1').strip().lower() in ('0', 'off', 'false', 'no')


def _switched_off():
    return _env_off(ENV_SWITCH)


def _compiler():
    cxx = os.environ.get('CXX') or 'g++'
    return shutil.which(cxx)


def _cpu_signature():
    """The CPU model and its feature flags: a library built with -march=native runs only there."""
    model, flags = '', ''
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            for line in f:
                if not model and line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                elif not flags and line.startswith('flags'):
                    flags = line.split(':', 1)[1].strip()
                if model and flags:
                    break
    except OSError:
        pass
    return model + '|' + flags


def _cache_root():
    root = os.environ.get(ENV_CACHE)
    if root:
        return os.path.abspath(os.path.expanduser(root))
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'retfound_mindspore', 'kernels')


def _check_private(folder):
    """Refuse a shared-temporary-directory folder that is a link, not ours, or writable by others."""
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f'{folder} is not a private folder of this user (a link, another owner, or writable '
                      f'by others); set {ENV_CACHE} to a folder of your own')


def _build(cxx):
    with open(SOURCE, 'rb') as f:
        src = f.read()
    version = subprocess.run([cxx, '--version'], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b'\0'.join([src, ' '.join(FLAGS).encode(), version.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    out_dir = os.path.join(_cache_root(), key)
    path = os.path.join(out_dir, LIB_NAME)
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError:
        if os.environ.get(ENV_CACHE):
            raise  # the user's choice: report it
        # a read-only home (containers, some clusters): build under the temporary directory instead,
        # in a folder only this user can write (its name is predictable: another user must not be
        # able to plant a library there for us to load)
        base = os.path.join(tempfile.gettempdir(), f'retfound_mindspore_kernels-{os.getuid()}')
        os.makedirs(base, mode=0o700, exist_ok=True)
        _check_private(base)
        out_dir = os.path.join(base, key)
        path = os.path.join(out_dir, LIB_NAME)
        if os.path.isfile(path):
            return path
        os.makedirs(out_dir, mode=0o700, exist_ok=True)
    # Build under a private name and rename: several msrun ranks may compile at once, and a
    # half-written library must never be loaded.
    fd, tmp = tempfile.mkstemp(prefix='.build-', suffix='.so', dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, '-o', tmp, SOURCE], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f'{cxx} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}')
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def library_path():
    """Path of the compiled kernel library, building it on first call; None when unavailable."""
    with _lock:
        if _state['tried']:
            return _state['path']
        _state['tried'] = True
        cxx = _compiler()
        if cxx is None:
            _state['error'] = ('no C++ compiler found (install g++ or set CXX); using MindSpore\'s own '
                               'CPU operators, which are slower')
        else:
            try:
                _state['path'] = _build(cxx)
            except (OSError, RuntimeError) as e:
                _state['error'] = f'could not build the fused CPU kernels ({e}); using MindSpore\'s own operators'
        if _state['error']:
            warnings.warn(_state['error'], RuntimeWarning, stacklevel=2)
        return _state['path']


def enabled():
    """True when the model should use the fused kernels: CPU target, not switched off, library built."""
    if _switched_off() or ms.get_context('device_target') != 'CPU':
        return False
    return library_path() is not None


def status():
    """One line for logs: whether the fused CPU kernels are in use and why not."""
    if ms.get_context('device_target') != 'CPU':
        return 'fused CPU kernels: not used (device is not CPU)'
    if _switched_off():
        return f'fused CPU kernels: off ({ENV_SWITCH}={os.environ.get(ENV_SWITCH)})'
    path = library_path()
    if path is None:
        return f'fused CPU kernels: unavailable ({_state["error"]})'
    gemm = {3: 'oneDNN fp32+bf16', 1: 'oneDNN fp32', 2: 'oneDNN bf16', 0: 'MindSpore MatMul'}[_gemm_bits()]
    precision = 'bf16 inputs, fp32 accumulation' if bf16_matmul() else 'fp32'
    packed = _lib().RfPackedMatmulAvailable()
    if bf16_matmul():
        precision += ('; evaluation: bf16 weights packed once (oneDNN matmul)' if packed else
                      '; evaluation: GEMM path (oneDNN matmul primitive not found)')
    elif _gemm_bits() & 1:
        if not packed:
            precision += '; evaluation: dnnl_sgemm (oneDNN matmul primitive not found)'
        elif _env_off(ENV_PACK):
            precision += f'; evaluation: dnnl_sgemm ({ENV_PACK}={os.environ.get(ENV_PACK)})'
        else:
            precision += ('; evaluation (4+ batches, no --amp_level O2/O3): fp32 weights packed in place '
                          '(oneDNN matmul)')
    return f'fused CPU kernels: on ({path}); Linear GEMMs: {gemm}, {precision}'


def _gemm_bits():
    """Which oneDNN GEMMs the library found in the process: bit 0 fp32, bit 1 bf16."""
    if _state['gemm'] is None:
        _state['gemm'] = 0
        try:
            lib = _lib()
            _state['gemm'] = int(lib.RfGemmAvailable()) if lib is not None else 0
        except (OSError, AttributeError):
            _state['gemm'] = 0
    return _state['gemm']


def _lib():
    """The kernel library through ctypes: the same file MindSpore loads for the operators, so the
    same instance in the process (its switches and counters are the operators' own)."""
    if _state['lib'] is None:
        path = library_path()
        if path is not None:
            _state['lib'] = ctypes.CDLL(path)
            _state['lib'].RfWeightCacheStat.restype = ctypes.c_int64
            _state['lib'].RfPoolSpinUs.restype = ctypes.c_int64
            _state['lib'].RfPoolSpinUs.argtypes = [ctypes.c_int64]
            _state['lib'].RfPackInPlace.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p),
                                                    ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64),
                                                    ctypes.POINTER(ctypes.c_int32)]
            _state['lib'].RfUnpackAllInPlace.restype = ctypes.c_int64
            _state['lib'].RfInPlaceStat.restype = ctypes.c_int64
    return _state['lib']


_frozen = {'depth': 0}
_stranded = []  # storage of weights an unpack failed to restore (kept alive: their addresses stay registered)


def _mixed_precision(model):
    """True when ``model`` or any of its cells runs under ``ms.amp`` O2/O3 (float16 Dense inputs:
    the layers then take MatMul, whose Cast would read a packed weight as a plain one)."""
    return any(cell.get_mixed_precision_type().name != 'NOTSET' for _, cell in model.cells_and_names())


def _in_place_weights(model):
    """The fp32 Linear weights of ``model`` whose fused forward can take them packed in place:
    each Dense layer with ``packs_in_place`` (fp32 oneDNN GEMM path); none under ms.amp O2/O3."""
    if _mixed_precision(model):
        return []
    return [cell.weight for _, cell in model.cells_and_names()
            if getattr(cell, 'packs_in_place', False) and cell.weight.dtype == ms.float32 and len(cell.weight.shape) == 2]


def _pack_in_place(lib, weights, views):
    """Reorder ``weights`` in their own storage into oneDNN's packed layout. ``views`` receives the
    numpy views of the storage handed to the library (kept by the caller until unpacked, so no
    registered storage can be freed); returns how many were packed."""
    for w in weights:
        a = w.asnumpy()  # the storage itself on CPU (a view); waits for any step still writing it
        # only where that view is the storage the operators receive (a copy would be packed for
        # nothing); a storage listed twice is packed once (the library skips repeated addresses)
        if a.dtype == np.float32 and a.flags['C_CONTIGUOUS'] and a.ctypes.data == w.data_ptr():
            views.append(a)
    count = len(views)
    if not count:
        return 0
    ptrs = (ctypes.c_void_p * count)(*[a.ctypes.data for a in views])
    ns = (ctypes.c_int64 * count)(*[a.shape[0] for a in views])
    ks = (ctypes.c_int64 * count)(*[a.shape[1] for a in views])
    status_ = (ctypes.c_int32 * count)()
    if lib.RfPackInPlace(count, ptrs, ns, ks, status_) != 0:
        return 0
    return sum(1 for st in status_ if st == 0)


def _unpack_in_place(lib, views):
    """Restore every weight packed in place; raises when some could not be (their storage, ``views``,
    is then kept for the life of the process: their addresses stay registered as packed)."""
    left = int(lib.RfUnpackAllInPlace())
    if left:
        _stranded.extend(views)
        raise RuntimeError(f'{left} Linear weight(s) packed for evaluation could not be restored to their plain '
                           'layout (out of memory?); the model in this process is unusable: do not save it, '
                           'reload it from its checkpoint')
    _stranded.clear()


class FrozenWeights:
    """What ``frozen_weights`` yields. ``verify()``, called after the block's first forward, checks
    that every fp32 weight packed in place was read by the packed Linear path since it was packed.
    If one was not (the forward reached it another way, e.g. through a MatMul and a Cast, and read
    it as a plain weight), it restores all of them, so the rest of the block runs on dnnl_sgemm,
    warns, and returns False: that forward's outputs must be computed again. True otherwise, and
    when this block packed nothing (also an inner block nested in one that packed: only the
    outermost block packs and can verify). It cannot see a reader that reads a weight *besides*
    the packed path: those are excluded by construction (see ``frozen_weights``)."""

    def __init__(self, lib=None, packed=0, views=()):
        self._lib, self._packed, self._views = lib, packed, views
        self._verified = packed == 0

    @property
    def packed(self):
        """How many weights this block packed in place (0 once restored)."""
        return self._packed

    def verify(self):
        if self._verified:
            return True
        self._verified = True
        unread = int(self._lib.RfInPlaceStat(2))
        if unread == 0:
            return True
        packed, self._packed = self._packed, 0
        _unpack_in_place(self._lib, self._views)
        warnings.warn(f'{unread} of {packed} Linear weights packed in place for evaluation were not read by the '
                      'packed forward; they are restored and this evaluation runs on the unpacked path '
                      f'(set {ENV_PACK}=0 to skip the packing)', RuntimeWarning, stacklevel=2)
        return False


def packed_in_place():
    """How many fp32 weights are packed in place now (inside ``frozen_weights(model)``); 0 without
    the library. Checkpoint writers refuse to save while this is non-zero."""
    if _state['lib'] is None:
        return 0
    return int(_state['lib'].RfInPlaceStat(0))


def in_place_stats():
    """{'weights', 'calls'}: fp32 weights packed in place now, and fp32 Linear forwards that used
    one since the library was loaded (None without it)."""
    if not enabled():
        return None
    lib = _lib()
    return {'weights': int(lib.RfInPlaceStat(0)), 'calls': int(lib.RfInPlaceStat(1))}


@contextlib.contextmanager
def frozen_weights(model=None, batches=None):
    """Declare that no weight changes inside this block (evaluation); engine ``predict`` holds it.
    Yields a ``FrozenWeights`` (see its ``verify``).

    bf16 Linear forwards (``--cpu_bf16``) then round and pack each weight once, into the blocked
    layout of oneDNN's matmul primitive, and reuse it on every later batch, instead of rounding
    and packing it on each call; the primitive also adds the bias. The values are those of the
    GEMM path except for the summation order inside the GEMM. The packed copies (2 bytes per
    weight) are freed when the outermost block exits. Each use checks the weight's fingerprint
    (shape and 64 sampled values), so a weight replaced or changed in any sampled value is packed
    again; a change that leaves all 64 sampled values equal is not seen: the block is a promise
    that the weights do not change (evaluation does not change them).

    fp32, given the ``model``: its Linear weights are reordered *in their own storage* into that
    packed layout (no packed copy: at most 4 weight-sized scratch buffers while reordering; 6% faster
    GEMMs than dnnl_sgemm, which packs on every call) and restored bit for bit when the outermost
    block exits, also on an exception. Inside the block those weights must only be read by the
    model's forward: the backward and the bf16 forward refuse them (the operator fails), checkpoint
    writers refuse to save (see ``packed_in_place``), models under ms.amp O2/O3 (whose Linear layers
    take MatMul on float16 inputs) are not packed, and the yielded object's ``verify()`` catches a
    packed weight the forward did not read through the packed path. Skipped when ``batches`` (the
    number of forwards the block will run) is below 4, where the reorders (~0.1 s per 100M weights
    each way; the forward gains ~4% of its time) would not pay, and with $RETFOUND_PACK_IN_PLACE=0.
    A no-op without the fused kernels or off CPU."""
    frozen, lib = _frozen, None  # (locals: a block left open at interpreter exit still closes)
    if frozen['depth'] == 0 and enabled():
        lib = _lib()
        if lib is not None and not lib.RfPackedMatmulAvailable():
            lib = None
    cache = lib is not None and bf16_matmul()
    in_place = (lib is not None and not bf16_matmul() and model is not None and (batches is None or batches >= 4)
                and not _env_off(ENV_PACK))
    block, views = FrozenWeights(), []
    frozen['depth'] += 1
    try:
        if cache:
            lib.RfSetWeightCache(1)
        if in_place:
            block = FrozenWeights(lib, _pack_in_place(lib, _in_place_weights(model), views), views)
        yield block
    finally:
        frozen['depth'] -= 1
        if cache:
            lib.RfSetWeightCache(0)
        if in_place and lib.RfInPlaceStat(0):  # (also after an interrupted pack, or a failed verify())
            _unpack_in_place(lib, views)


def weight_cache_stats():
    """{'weights', 'bytes', 'packs', 'calls'}: packed weights held now and their bytes, packs made
    and bf16 Linear forwards that tried the packed path, since the library was loaded (None without it)."""
    if not enabled():
        return None
    lib = _lib()
    return {name: int(lib.RfWeightCacheStat(i)) for i, name in enumerate(('weights', 'bytes', 'packs', 'calls'))}


def pool_spin_us(us=None):
    """How long (microseconds) the kernels' worker threads poll for the next call before blocking;
    with ``us``, set it (0: block at once) and return the previous value. The default, 300, or
    $RETFOUND_KERNEL_SPIN_US when set, is read when the library is loaded. None without the library.
    Results never depend on it, only the time a call waits for a blocked thread to wake."""
    if not enabled():
        return None
    return int(_lib().RfPoolSpinUs(-1 if us is None else max(0, int(us))))


def linear_available(bf16=False):
    """True when Linear layers can run through the library's oneDNN GEMM (fp32, or bf16)."""
    return enabled() and bool(_gemm_bits() & (2 if bf16 else 1))


def cpu_has_bf16():
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 GEMMs gain nothing."""
    flags = set(_cpu_signature().split('|', 1)[-1].split())
    return bool(flags & {'avx512_bf16', 'amx_bf16'})


def set_bf16_matmul(flag):
    """Models built after this call multiply in bf16 in their Linear layers (CPU; see linear_op)."""
    _state['bf16_matmul'] = bool(flag)


def save_bf16_inputs():
    """Whether bf16 operators built now should hand their bf16 GEMM inputs to their backward (the
    ``save_bf16`` of linear_op / attention_recompute_op): in GRAPH mode the fp32 sources are then
    freed after the forward; PyNative's autograd keeps a custom op's inputs anyway, so there the
    copies would only add memory."""
    return ms.get_context('mode') == ms.GRAPH_MODE


def bf16_matmul():
    return _state['bf16_matmul']


# ---------------------------------------------------------------------------
# Operators. Each factory returns a fresh ops.Custom whose bprop calls the matching backward
# kernel; the forward outputs a backward needs (LayerNorm mean/rstd, softmax y) are outputs of
# the forward op, so nothing is recomputed.
# ---------------------------------------------------------------------------
def _custom(func, out_shape, out_dtype, bprop=None):
    path = library_path()
    if path is None:
        raise RuntimeError(status())
    return ops.Custom(f'{path}:{func}', out_shape=out_shape, out_dtype=out_dtype, func_type='aot', bprop=bprop)


def _rows(shape):
    return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def layer_norm_op():
    """op(x, weight, bias, eps (1,)) -> (y, mean (M,), rstd (M,)) over the last axis."""
    bwd = _custom('RfLayerNormBwd',
                  lambda x, g, m, r, dy: (x, g, g), lambda x, g, m, r, dy: (x, g, g))

    def bprop(x, weight, bias, eps, out, dout):
        dx, dg, db = bwd(x, weight, out[1], out[2], dout[0])
        return dx, dg, db, ops.zeros_like(eps)

    return _custom('RfLayerNormFwd',
                   lambda x, g, b, e: (x, [_rows(x)], [_rows(x)]),
                   lambda x, g, b, e: (x, x, x), bprop)


def bias_add_op():
    """op(x (..., N), bias (N)) -> x + bias."""
    bwd = _custom('RfBiasGrad', lambda dy: [dy[-1]], lambda dy: dy)

    def bprop(x, bias, out, dout):
        return dout, bwd(dout)

    return _custom('RfBiasAdd', lambda x, b: x, lambda x, b: x, bprop)


def bias_gelu_op():
    """op(x (..., N), bias (N)) -> exact (erf) GELU of x + bias, torch.nn.GELU()'s function."""
    bwd = _custom('RfBiasGeluBwd', lambda x, b, dy: (x, b), lambda x, b, dy: (x, b))

    def bprop(x, bias, out, dout):
        dx, db = bwd(x, bias, dout)
        return dx, db

    return _custom('RfBiasGeluFwd', lambda x, b: x, lambda x, b: x, bprop)


def gelu_op():
    """op(x) -> exact (erf) GELU."""
    bwd = _custom('RfGeluBwd', lambda x, dy: x, lambda x, dy: x)

    def bprop(x, out, dout):
        return (bwd(x, dout),)

    return _custom('RfGeluFwd', lambda x: x, lambda x: x, bprop)


def softmax_op():
    """op(x) -> softmax over the last axis."""
    bwd = _custom('RfSoftmaxBwd', lambda y, dy: y, lambda y, dy: y)

    def bprop(x, out, dout):
        return (bwd(out, dout),)

    return _custom('RfSoftmaxFwd', lambda x: x, lambda x: x, bprop)


def qkv_split_op(num_heads):
    """op(qkv (B, N, 3C), scale (1,)) -> q * scale, k, v, each (B, num_heads, N, C / num_heads).

    The same values as timm's ``qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)``
    followed by ``q * scale``, in one pass instead of a transpose copy and three slices.
    """
    heads = int(num_heads)

    def split_shape(qkv, scale):
        b, n, c3 = qkv
        shape = [b, heads, n, c3 // (3 * heads)]
        return shape, shape, shape

    merge = _custom('RfQkvMerge',
                    lambda dq, dk, dv, s: [dq[0], dq[2], 3 * dq[1] * dq[3]],
                    lambda dq, dk, dv, s: dq)

    def bprop(qkv, scale, out, dout):
        return merge(dout[0], dout[1], dout[2], scale), ops.zeros_like(scale)

    return _custom('RfQkvSplit', split_shape, lambda qkv, s: (qkv, qkv, qkv), bprop)


def linear_op(bf16=False, save_bf16=True):
    """op(x (..., K), weight (N, K), bias (N)) -> x @ weight.T + bias, with the three gradients in
    one backward kernel (dx = dy @ W, dW = dy^T @ x, db = column sums of dy).

    oneDNN's GEMMs (the libdnnl MindSpore ships), split over the kernel threads by rows; one
    output instead of MatMul's and BiasAdd's two. ``bf16=True``: GEMM inputs rounded to bfloat16
    (nearest even), fp32 accumulation, fp32 output — what torch.autocast('cpu', torch.bfloat16)
    does for nn.Linear, except that the output stays fp32. The op then returns ``(y, xb)``: xb is
    x rounded to bf16 (the GEMM's input anyway), and the backward keeps xb instead of x — half the
    memory for the same values, as autocast keeps its bf16 copy of x. ``save_bf16=False`` (for
    PyNative, whose autograd keeps every input of a custom op for its backward anyway): only ``y``,
    and the backward rounds x again.
    """
    if bf16 and save_bf16:  # -> (y, xb); the backward takes xb
        bwd = _custom('RfLinearBf16Bwd', lambda xb, w, dy: (xb, w, [w[0]]), lambda xb, w, dy: (dy, dy, dy))

        def bprop(x, weight, bias, out, dout):
            return bwd(out[1], weight, dout[0])

        return _custom('RfLinearBf16Fwd', lambda x, w, b: (list(x[:-1]) + [w[0]], x),
                       lambda x, w, b: (x, ms.bfloat16), bprop)
    name = 'RfLinearBf16NoSave' if bf16 else 'RfLinear'
    bwd = _custom(name + 'Bwd', lambda x, w, dy: (x, w, [w[0]]), lambda x, w, dy: (x, w, w))

    def bprop(x, weight, bias, out, dout):
        dx, dw, db = bwd(x, weight, dout)
        return dx, dw, db

    return _custom(name + 'Fwd', lambda x, w, b: list(x[:-1]) + [w[0]], lambda x, w, b: x, bprop)


def attention_op(num_heads, bf16=False):
    """op(qkv (B, N, 3C), scale (1,)) -> (out (B, N, C), p (B, num_heads, N, N)).

    timm's attention core in one operator: q, k, v read in place from the qkv projection
    (reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)), p = softmax(scale * q k^T), out = p v with the
    heads merged back (transpose(1, 2).reshape(B, N, C)). ``p`` is kept for the backward kernel;
    the scores, the split q/k/v and the unmerged output never exist. oneDNN GEMMs, one
    (batch, head) pair per task. No attention dropout (RETFound uses none).

    ``bf16=True`` (the --cpu_bf16 mode): q, k, v, p (and in the backward dout and the softmax
    gradient) enter the GEMMs rounded to bfloat16, with fp32 accumulation; softmax, ``p`` and
    ``out`` stay fp32 — what torch.autocast('cpu', torch.bfloat16) does in timm's
    scaled_dot_product_attention, except that the output stays fp32.

    The model runs attention_recompute_op (the same arithmetic without keeping ``p``); this
    variant, which returns ``p``, is its reference in the tests.
    """
    heads = int(num_heads)
    name = 'RfAttnBf16' if bf16 else 'RfAttn'

    def fwd_shape(qkv, scale):
        b, n, c3 = qkv
        return [b, n, c3 // 3], [b, heads, n, n]

    bwd = _custom(name + 'Bwd', lambda qkv, p, d, s: qkv, lambda qkv, p, d, s: qkv)

    def bprop(qkv, scale, out, dout):
        return bwd(qkv, out[1], dout[0], scale), ops.zeros_like(scale)

    return _custom(name + 'Fwd', fwd_shape, lambda qkv, s: (qkv, qkv), bprop)


def attention_recompute_op(num_heads, bf16=False, save_bf16=True):
    """op(qkv (B, N, 3C), scale (1,), heads (1,)) -> out (B, N, C): attention_op's ``out`` without
    ``p`` (B, num_heads, N, N), the largest tensor of the core, ever being written to memory or
    kept for the backward. ``heads`` holds num_heads as a float (``scalar``). What the model uses,
    in training and in evaluation.

    Forward: each (batch, head) task keeps its head's probabilities in a scratch buffer that stays
    in cache (ViT-L/16 batch 8: ~7% less time than attention_op). Backward (one kernel): each task
    recomputes its head's p with the forward's own GEMM call and softmax row, bit-identical to the
    forward's, then runs attention_op's backward arithmetic — as torch's CPU flash attention keeps
    no probabilities either. Only qkv is kept between forward and backward: ViT-L/16 at batch 8
    saves 24 x 20 MB, for one extra q k^T GEMM and softmax per head in the backward.

    ``bf16=True``: returns ``(out, qkvb)``, qkvb being qkv rounded to bf16 (what the GEMMs take
    anyway); the backward keeps qkvb instead of qkv, half the memory for the same values.
    ``save_bf16=False`` (PyNative, as for linear_op): only ``out``; the backward rounds qkv again.
    """
    name = ('RfAttnBf16' if save_bf16 else 'RfAttnBf16NoSave') if bf16 else 'RfAttn'
    out_shape = lambda qkv, s, h: [qkv[0], qkv[1], qkv[2] // 3]  # noqa: E731
    if bf16 and save_bf16:  # -> (out, qkvb); the backward takes qkvb
        bwd = _custom(name + 'RecomputeBwd', lambda qkvb, d, s, h: qkvb, lambda qkvb, d, s, h: d)

        def bprop(qkv, scale, heads, out, dout):
            return bwd(out[1], dout[0], scale, heads), ops.zeros_like(scale), ops.zeros_like(heads)

        return _custom(name + 'InferFwd', lambda qkv, s, h: (out_shape(qkv, s, h), qkv),
                       lambda qkv, s, h: (qkv, ms.bfloat16), bprop)
    bwd = _custom(name + 'RecomputeBwd', lambda qkv, d, s, h: qkv, lambda qkv, d, s, h: qkv)

    def bprop(qkv, scale, heads, out, dout):
        return bwd(qkv, dout, scale, heads), ops.zeros_like(scale), ops.zeros_like(heads)

    return _custom(name + 'InferFwd', out_shape, lambda qkv, s, h: qkv, bprop)


def row_scale_op():
    """op(x (B, ...), s (B,)) -> x * s[b]: drop path with s = mask / keep_prob (no gradient for s)."""
    scale = _custom('RfRowScale', lambda x, s: x, lambda x, s: x)

    def bprop(x, s, out, dout):
        return scale(dout, s), ops.zeros_like(s)

    return _custom('RfRowScale', lambda x, s: x, lambda x, s: x, bprop)


def add_row_scale_op():
    """op(x, y (B, ...), s (B,)) -> x + y * s[b]: a residual connection through drop path in one
    operator (one output; MindSpore's broadcast Mul and its gradient kept ~7 full-size tensors
    alive per call in a GRAPH train step)."""
    scale = _custom('RfRowScale', lambda x, s: x, lambda x, s: x)

    def bprop(x, y, s, out, dout):
        return dout, scale(dout, s), ops.zeros_like(s)

    return _custom('RfAddRowScale', lambda x, y, s: x, lambda x, y, s: x, bprop)


def adamw_op():
    """op(param, exp_avg, exp_avg_sq, grad, step_h (6,), group_h (2,)) -> done (1,): one torch AdamW
    step written IN PLACE into param, exp_avg and exp_avg_sq (fp32; see RfAdamWStep for the
    scalars). MindSpore does not know the op writes its inputs: the caller must make it wait for
    every reader of the parameter (util_mindspore/optim.py makes ``step_h`` depend on all of the
    step's gradients) and consume ``done``."""
    return _custom('RfAdamWStep', lambda p, m, v, g, sh, gh: [1], lambda p, m, v, g, sh, gh: p)


def scalar(value):
    """A (1,) float32 tensor holding a kernel's scalar argument (eps, scale)."""
    return Tensor(np.array([value], dtype=np.float32))
