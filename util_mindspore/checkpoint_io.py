# --------------------------------------------------------
# RETFound for MindSpore: reading checkpoints without executing code from them.
# Derived from: the torch.save formats (zip: data.pkl + data/N storages; the pre-1.6 legacy
# format), safetensors and MindSpore .ckpt, read for the loaders in weight_converter.py
# (rmaphoh/RETFound main_finetune.py used torch.load, which runs arbitrary pickled code).
# Written anew: a restricted unpickler accepts tensors, containers and argparse.Namespace only.
# --------------------------------------------------------
import collections
import functools
import json
import os
import pickle
import struct
import types
import zipfile

import numpy as np

__all__ = ['WeightLoadError', 'read_checkpoint']


class WeightLoadError(RuntimeError):
    """A checkpoint could not be found, read, or matched to the model. The message says what to do."""


# ---------------------------------------------------------------------------
# Reading: .pth (torch zip or legacy), .ckpt, .safetensors -> nested dict of numpy arrays
# ---------------------------------------------------------------------------
_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_TORCH_DTYPES = {'float64': np.float64, 'float32': np.float32, 'float16': np.float16, 'bfloat16': np.float32,
                 'int64': np.int64, 'int32': np.int32, 'int16': np.int16, 'int8': np.int8,
                 'uint8': np.uint8, 'bool': np.bool_}


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _TensorType:
    """Stands for torch.Tensor / torch.nn.Parameter in _rebuild_from_type_v2."""


def _bf16_to_float32(raw):
    return (np.frombuffer(raw, dtype='<u2').astype(np.uint32) << 16).view(np.float32)


def _storage_from_bytes(raw, storage_type, big_endian=False):
    if storage_type.dtype == 'bfloat16':
        if big_endian:
            raw = np.frombuffer(raw, dtype='>u2').astype('<u2').tobytes()
        return _bf16_to_float32(raw)
    dt = np.dtype(storage_type.dtype).newbyteorder('>' if big_endian else '<')
    return np.frombuffer(raw, dtype=dt).astype(np.dtype(storage_type.dtype).newbyteorder('='))


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """torch._utils._rebuild_tensor(_v2): a strided view of a flat storage, copied out."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or storage_offset < 0:
        raise WeightLoadError(f'corrupt tensor record: size {size}, stride {stride}')
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:  # never let as_strided read outside the storage
        raise WeightLoadError(f'corrupt tensor record: needs element {last} of a storage of {storage.size}')
    if int(np.prod(size, dtype=np.float64)) > storage.size:
        # more elements than the storage holds: a stride-0 / overlapping view, which a tiny file can
        # use to ask for any amount of memory (model weights are never saved that way)
        raise WeightLoadError(f'refusing a tensor view of {size} (strides {stride}) over a storage of '
                              f'{storage.size} elements: it repeats elements')
    contiguous = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    if storage_offset == 0 and stride == contiguous and last == storage.size - 1:
        return storage.reshape(size)  # the common case: the whole storage, no second copy
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=[s * storage.itemsize for s in stride])
    return np.array(view)


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if not isinstance(new_type, type) or not issubclass(new_type, _TensorType):
        raise WeightLoadError(f'refusing to rebuild an object of type {new_type!r}')
    return func(*args)


def _latin1_encode(text, encoding='latin1'):
    # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); allow only that
    if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
        raise WeightLoadError(f'refusing _codecs.encode with encoding {encoding!r}')
    return text.encode('latin1')


def _torch_dtype(name):
    return _TORCH_DTYPES[name]


def _plain_dtype(spec):
    """np.dtype(spec) if it is a plain number or bool type (no objects, fields or sub-arrays)."""
    try:
        dt = np.dtype(spec)
    except Exception as e:
        raise WeightLoadError(f'refusing numpy dtype {spec!r} ({type(e).__name__})') from None
    if dt.kind not in 'biufc' or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise WeightLoadError(f'refusing numpy dtype {dt!r}: only plain numeric arrays are read')
    return dt


def _safe_dtype(spec, align=False, copy=False):
    """numpy.dtype as pickled ('f8', False, True): plain numeric types only."""
    return _plain_dtype(spec)


def _safe_ndarray(shape, dtype=float, buffer=None, offset=0, strides=None, order=None):
    """numpy.ndarray(...) called by a pickle: plain numeric, data copied from bytes, zeros (never
    uninitialised memory) without a buffer."""
    dt = _plain_dtype(dtype)
    shape = tuple(int(n) for n in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    if any(n < 0 for n in shape) or strides is not None:
        raise WeightLoadError(f'refusing numpy.ndarray{shape!r} with strides {strides!r}')
    if buffer is None:
        return np.zeros(shape, dtype=dt)
    return np.ndarray(shape, dtype=dt, buffer=bytes(buffer), offset=int(offset)).copy()


def _safe_reconstruct(subtype, shape, dtype):
    """numpy's pickled arrays: _reconstruct(ndarray, (0,), b'b'), then BUILD sets shape, dtype and
    data (the dtype, unpickled through _safe_dtype, is a plain numeric one)."""
    if getattr(subtype, 'func', subtype) is not _safe_ndarray:  # (find_class hands out a partial of it)
        raise WeightLoadError(f'refusing to reconstruct a {subtype!r}')
    return np.core.multiarray._reconstruct(np.ndarray, tuple(int(n) for n in shape), _plain_dtype(dtype))


def _safe_scalar(dtype, data=None):
    """numpy scalars (np.float64(0.5) pickled): plain numeric dtype, its exact number of bytes."""
    dt = _plain_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise WeightLoadError(f'refusing a numpy {dt} scalar from {type(data).__name__} data')
    return np.frombuffer(data, dtype=dt)[0]


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles torch checkpoints into numpy without importing anything but an allow-list."""

    SAFE = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
        ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
        ('torch', 'Tensor'): _TensorType,
        ('torch.nn.parameter', 'Parameter'): _TensorType,
        ('torch', 'Size'): tuple,
        # the original's fine-tuned checkpoints pickle the argparse arguments under 'args'
        ('argparse', 'Namespace'): types.SimpleNamespace,
        ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset,
        ('builtins', 'slice'): slice, ('builtins', 'complex'): complex,
        # numpy scalars/arrays (e.g. a best metric stored as np.float64), through checked wrappers:
        # numpy's own functions build object arrays and structured dtypes from file bytes, i.e.
        # pointers the file chooses (a crafted .pth crashed the interpreter through them)
        ('_codecs', 'encode'): _latin1_encode,
        ('numpy', 'dtype'): _safe_dtype, ('numpy', 'ndarray'): _safe_ndarray,
        ('numpy.core.multiarray', 'scalar'): _safe_scalar,
        ('numpy._core.multiarray', 'scalar'): _safe_scalar,
        ('numpy.core.multiarray', '_reconstruct'): _safe_reconstruct,
        ('numpy._core.multiarray', '_reconstruct'): _safe_reconstruct,
    }

    def __init__(self, fileobj, path, load_storage):
        super().__init__(fileobj)
        # A pickle can BUILD (set attributes) on anything find_class returns: hand out objects that
        # belong to this load only (a partial per function, a subclass for torch.Tensor), so that a
        # crafted file cannot change this module's functions or classes for later loads.
        self.safe = {k: (functools.partial(v) if isinstance(v, types.FunctionType) else v)
                     for k, v in self.SAFE.items()}
        tensor_type = type('Tensor', (_TensorType,), {})
        self.safe[('torch', 'Tensor')] = self.safe[('torch.nn.parameter', 'Parameter')] = tensor_type
        self.path = path
        self.load_storage = load_storage
        self.storages = {}
        self.storage_types = {}
        self.stored = 0  # bytes of the storages read so far
        self.copied = 0  # bytes of views copied out of them (bounded: see _rebuild)
        self.rebuild = self._rebuild

    def find_class(self, module, name):
        if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
            return self.rebuild
        if (module, name) in self.safe:
            return self.safe[(module, name)]
        if module == 'torch' and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == 'torch' and name in _TORCH_DTYPES:
            return _torch_dtype(name)
        if module == 'torch._utils' and name.startswith('_rebuild'):
            raise WeightLoadError(
                f"{self.path}: holds a kind of tensor this loader does not read ('{module}.{name}': e.g. complex, "
                f"float8, uint16, sparse or quantized tensors, or a Parameter with extra attributes); re-save its "
                f"tensors as float32/bfloat16/float16 or integer dense tensors")
        raise WeightLoadError(
            f"{self.path}: refused: the file tries to import '{module}.{name}', which is not a tensor, "
            f"a container or argparse.Namespace. Unpickling it could run arbitrary code, so it is not loaded. "
            f"If you trust this file, re-save only its tensors (e.g. torch.save({{'model': sd}}, ...)).")

    def _rebuild(self, storage, *args):
        out = _rebuild_tensor(storage, *args)
        if not np.may_share_memory(out, storage):
            self.copied += out.nbytes
            if self.copied > 4 * self.stored + (64 << 20):
                # many views of one storage: a small file asking for much more memory than it holds
                raise WeightLoadError(f'{self.path}: refused: its tensors would need {self.copied >> 20} MB copied '
                                      f'out of {self.stored >> 20} MB of stored data (overlapping views)')
        return out

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
            raise WeightLoadError(f'{self.path}: unknown persistent id {pid!r}')
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise WeightLoadError(f'{self.path}: unsupported storage type {storage_type!r}')
        if key not in self.storages:
            self.storages[key] = self.load_storage(key, storage_type, pid)
            self.storage_types[key] = storage_type.name
            self.stored += getattr(self.storages[key], 'nbytes', 0)  # (None in the legacy first pass)
        elif self.storage_types[key] != storage_type.name:
            raise WeightLoadError(f'{self.path}: storage {key} is read as {self.storage_types[key]} and as '
                                  f'{storage_type.name}: corrupt or crafted file')
        storage = self.storages[key]
        if len(pid) > 5 and pid[5] is not None:  # legacy view metadata: (view_key, offset, size)
            _, offset, size = pid[5]
            offset, size = int(offset), int(size)
            if storage is not None and (offset < 0 or size < 0 or offset + size > storage.size):
                raise WeightLoadError(f'{self.path}: corrupt storage view ({offset}, {size}) of {storage.size}')
            storage = storage[offset:offset + size] if storage is not None else None
        return storage


def _read_torch_zip(path):
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise WeightLoadError(f'{path}: truncated or corrupt PyTorch checkpoint ({e}); download it again') from e
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
        if not pkl:
            raise WeightLoadError(f'{path}: a zip file without data.pkl is not a PyTorch checkpoint')
        prefix = pkl[0][:-len('data.pkl')]
        big_endian = False
        if prefix + 'byteorder' in names:
            order = zf.read(prefix + 'byteorder').strip()
            if order not in (b'little', b'big'):
                raise WeightLoadError(f'{path}: unknown byte order {order[:20]!r} in a PyTorch checkpoint')
            big_endian = order == b'big'

        def load_storage(key, storage_type, pid):
            info = zf.getinfo(f'{prefix}data/{key}')
            # torch stores its members uncompressed; a compressed one that inflates far beyond its
            # size is a zip bomb (its declared size bounds what zipfile reads)
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > 64 * info.compress_size + (1 << 20):
                raise WeightLoadError(f'{path}: refused: member {info.filename} inflates {info.compress_size} bytes '
                                      f'to {info.file_size}: not a PyTorch checkpoint')
            return _storage_from_bytes(zf.read(info), storage_type, big_endian)

        try:
            with zf.open(pkl[0]) as f:
                return _RestrictedUnpickler(f, path, load_storage).load()
        except WeightLoadError:
            raise
        except Exception as e:  # BadZipFile, KeyError, zlib.error, UnpicklingError, EOFError ...
            raise WeightLoadError(f'{path}: truncated or corrupt PyTorch checkpoint '
                                  f'({type(e).__name__}: {e}); download it again') from e


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def _read_torch_legacy(path):
    """torch.save(..., _use_new_zipfile_serialization=False): magic, protocol, sys info and the
    object as pickles, then the list of storage keys and the raw storages. The object comes
    before its storages, so it is unpickled twice: once to learn the storages, once to build."""
    def fail(e):
        return WeightLoadError(f'{path}: truncated or corrupt PyTorch checkpoint '
                               f'({type(e).__name__}: {e}); download it again')

    with open(path, 'rb') as f:
        try:
            if _RestrictedUnpickler(f, path, None).load() != _LEGACY_MAGIC:
                raise WeightLoadError(f'{path}: not a checkpoint (a pickle, but not a PyTorch one)')
            _RestrictedUnpickler(f, path, None).load()  # protocol version
            _RestrictedUnpickler(f, path, None).load()  # sys info
            obj_pos = f.tell()
            types_of = {}

            def note(key, storage_type, pid):
                types_of[key] = (storage_type, int(pid[4]))
                return None

            first = _RestrictedUnpickler(f, path, note)
            first.rebuild = lambda *args: None
            first.load()
            storages = {}
            for key in _RestrictedUnpickler(f, path, None).load():
                storage_type, numel = types_of[str(key)]
                (n,) = struct.unpack('<q', f.read(8))
                itemsize = 2 if storage_type.dtype == 'bfloat16' else np.dtype(storage_type.dtype).itemsize
                raw = f.read(n * itemsize)
                if n != numel or len(raw) != n * itemsize:
                    raise WeightLoadError(f'{path}: truncated or corrupt PyTorch checkpoint; download it again')
                storages[str(key)] = _storage_from_bytes(raw, storage_type)
            f.seek(obj_pos)
            return _RestrictedUnpickler(f, path, lambda key, storage_type, pid: storages[key]).load()
        except WeightLoadError:
            raise
        except Exception as e:
            raise fail(e) from e


def _read_safetensors(path):
    """Own reader (the format is 8 bytes + JSON header + raw data) so that BF16 also works."""
    try:
        with open(path, 'rb') as f:
            (n,) = struct.unpack('<Q', f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
    except Exception as e:
        raise WeightLoadError(f'{path}: not a readable .safetensors file ({type(e).__name__}: {e})') from e
    dtypes = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64, 'I32': np.int32,
              'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}
    itemsizes = dict({k: np.dtype(v).itemsize for k, v in dtypes.items()}, BF16=2)

    def bad(why):
        return WeightLoadError(f'{path}: not a valid .safetensors file ({why})')

    if not isinstance(header, dict):
        raise bad('its header is not a JSON object')
    out = collections.OrderedDict()
    spans = []
    for name, info in header.items():
        if name == '__metadata__':
            continue
        # the checks of the safetensors library: known dtype, whole-number shape and offsets, the
        # data inside the file, its size equal to the shape's, tensors not overlapping
        if not isinstance(info, dict) or info.get('dtype') not in itemsizes:
            raise bad(f'tensor {name!r}: dtype {info.get("dtype") if isinstance(info, dict) else info!r} '
                      f'is not one this reader knows ({", ".join(sorted(itemsizes))})')
        shape, offsets = info.get('shape'), info.get('data_offsets')
        if (not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise bad(f'tensor {name!r}: shape {shape!r}, data_offsets {offsets!r}')
        start, end = offsets
        if end > len(data):
            raise WeightLoadError(f'{path}: truncated .safetensors file; download it again')
        if not 0 <= start <= end or end - start != int(np.prod(shape, dtype=np.float64)) * itemsizes[info['dtype']]:
            raise bad(f'tensor {name!r}: data_offsets {offsets} do not hold a {info["dtype"]} tensor of shape {shape}')
        spans.append((start, end, name))
        raw = data[start:end]
        arr = _bf16_to_float32(raw) if info['dtype'] == 'BF16' else np.frombuffer(raw, dtype=dtypes[info['dtype']])
        out[name] = arr.reshape(shape).copy()
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise bad(f'tensors {a!r} and {b!r} overlap')
    return out


def _read_mindspore_ckpt(path):
    import mindspore as ms
    try:
        params = ms.load_checkpoint(path, crc_check=True)
    except Exception as e:
        raise WeightLoadError(f'{path}: truncated or corrupt MindSpore checkpoint '
                              f'({type(e).__name__}: {e})') from e
    out = collections.OrderedDict()
    for k, v in params.items():
        if not isinstance(v, str) and not hasattr(v, 'asnumpy'):
            raise WeightLoadError(f'{path}: entry {k!r} of this MindSpore checkpoint holds no tensor')
        out[k] = v if isinstance(v, str) else v.asnumpy()
    return out


def read_checkpoint(path):
    """Read a checkpoint into (nested) dicts of numpy arrays without executing code from it.

    .ckpt -> MindSpore (CRC checked); .safetensors; anything else -> PyTorch (zip or legacy
    format). argparse.Namespace objects come back as types.SimpleNamespace.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightLoadError(f'checkpoint not found: {path}')
    if path.endswith('.ckpt'):
        return _read_mindspore_ckpt(path)
    if path.endswith('.safetensors'):
        return _read_safetensors(path)
    with open(path, 'rb') as f:
        head = f.read(4)
    if head.startswith(b'PK'):
        return _read_torch_zip(path)
    if head[:1] == b'\x80':  # a pickle stream: pre-1.6 torch.save
        return _read_torch_legacy(path)
    raise WeightLoadError(f'{path}: not a checkpoint (expected a PyTorch .pth, a MindSpore .ckpt '
                          f'or a .safetensors file; the file starts with {head!r})')
