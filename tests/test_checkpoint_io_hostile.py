"""util_mindspore/checkpoint_io.py against crafted files: a .pth must never crash the interpreter,
allocate far more memory than it holds, change the loader for later files, or read out of its
data; it is refused with a WeightLoadError instead. (Cases found by a review that tried to break
the loader: numpy's pickle helpers building object arrays from file bytes, stride-0 views, zip
bombs, lying .safetensors headers, BUILD on the classes find_class hands out.)

Pickles are written opcode by opcode (protocol 2) so that each case is exactly the hostile input.
"""
import json
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from util_mindspore import checkpoint_io
from util_mindspore.checkpoint_io import WeightLoadError, read_checkpoint
from tests.helpers import ROOT


# ---------------------------------------------------------------- a tiny pickle writer
def _global(module, name):
    return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def _str(s):
    raw = s.encode()
    return b'X' + struct.pack('<I', len(raw)) + raw


def _bytes(b):
    return b'B' + struct.pack('<I', len(b)) + b


def _int(n):
    return b'J' + struct.pack('<i', n)


def _tuple(*items):
    return b'(' + b''.join(items) + b't'


def _call(fn, *args):
    return fn + _tuple(*args) + b'R'


def _dict(**kv):
    return b'}(' + b''.join(_str(k) + v for k, v in kv.items()) + b'u'


def _program(body):
    return b'\x80\x02' + body + b'.'


def _storage(key, numel):
    return _tuple(_str('storage'), _global('torch', 'FloatStorage'), _str(key), _str('cpu'), _int(numel)) + b'Q'


def _tensor(storage, offset, size, stride):
    return _call(_global('torch._utils', '_rebuild_tensor_v2'), storage, _int(offset),
                 _tuple(*map(_int, size)), _tuple(*map(_int, stride)), b'\x89',
                 _call(_global('collections', 'OrderedDict')))


def _zip(path, pkl, storages=None, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, 'w', compression=compression) as z:
        z.writestr('archive/data.pkl', pkl)
        z.writestr('archive/version', '3\n')
        for key, raw in (storages or {}).items():
            z.writestr(f'archive/data/{key}', raw)
    return path


_CHILD = r'''
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
sys.path.insert(0, {root!r})
from util_mindspore.checkpoint_io import read_checkpoint, WeightLoadError
try:
    read_checkpoint(sys.argv[1])
    print("LOADED")
except WeightLoadError as e:
    print("REFUSED", e)
'''


def _read_in_child(path):
    """read_checkpoint in a subprocess with 3 GB of address space: a crash is a return code, not a
    dead test run."""
    proc = subprocess.run([sys.executable, '-c', _CHILD.format(root=ROOT), str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    return proc.stdout.strip()


def test_numpy_object_arrays_from_file_bytes_are_refused(tmp_path):
    """numpy.ndarray((2,), dtype('O'), b'AAAAAAAABBBBBBBB'): pointers chosen by the file, which
    segfaulted the interpreter when copied."""
    obj_array = _call(_global('numpy', 'ndarray'), _tuple(_int(2)), _call(_global('numpy', 'dtype'), _str('O')),
                      _bytes(b'A' * 8 + b'B' * 8))
    pkl = _program(_dict(model=_dict(w=obj_array)))
    out = _read_in_child(_zip(tmp_path / 'obj.pth', pkl))
    assert out.startswith('REFUSED') and 'only plain numeric arrays' in out


def test_structured_dtypes_and_scalars_with_the_wrong_size_are_refused(tmp_path):
    structured = _call(_global('numpy', 'dtype'), b']' + b'(' + _tuple(_str('a'), _str('i8')) + b'e')
    pkl = _program(_dict(x=_call(_global('numpy.core.multiarray', 'scalar'), structured, _bytes(b'A' * 8))))
    assert _read_in_child(_zip(tmp_path / 'structured.pth', pkl)).startswith('REFUSED')
    f8 = _call(_global('numpy', 'dtype'), _str('f8'))
    pkl = _program(_dict(x=_call(_global('numpy.core.multiarray', 'scalar'), f8, _bytes(b'A' * 3))))
    assert _read_in_child(_zip(tmp_path / 'short.pth', pkl)).startswith('REFUSED')


def test_a_numpy_scalar_and_an_array_still_load(tmp_path):
    """What real checkpoints pickle (np.float64 metrics, small arrays) keeps working."""
    import pickle
    path = _zip(tmp_path / 'np.pth', pickle.dumps({'best': np.float64(0.75), 'a': np.arange(6, dtype=np.int32)},
                                                   protocol=2))
    got = read_checkpoint(path)
    assert got['best'] == 0.75 and got['a'].tolist() == list(range(6))


def test_an_array_without_data_is_zeros_not_uninitialised_memory(tmp_path):
    pkl = _program(_dict(x=_call(_global('numpy', 'ndarray'), _tuple(_int(4096)), _str('u1'))))
    got = read_checkpoint(_zip(tmp_path / 'uninit.pth', pkl))
    assert got['x'].shape == (4096,) and not got['x'].any()


def test_a_stride_zero_view_cannot_ask_for_gigabytes(tmp_path):
    """One stored float viewed as 60000 x 60000 with strides (0, 0): 13 GB from a 500-byte file."""
    pkl = _program(_dict(w=_tensor(_storage('0', 1), 0, (60000, 60000), (0, 0))))
    out = _read_in_child(_zip(tmp_path / 'stride0.pth', pkl, {'0': np.zeros(1, np.float32).tobytes()}))
    assert out.startswith('REFUSED') and 'repeats elements' in out


def test_many_views_of_one_storage_are_bounded(tmp_path):
    """300 overlapping views (offset 1) of one 4 MB storage would copy 1.2 GB out of it."""
    n = 1 << 20
    views = b''.join(_str(f't{i}') + _tensor(_storage('0', n), 1, (n - 1,), (1,)) for i in range(300))
    pkl = _program(b'}(' + views + b'u')
    out = _read_in_child(_zip(tmp_path / 'views.pth', pkl, {'0': np.zeros(n, np.float32).tobytes()}))
    assert out.startswith('REFUSED') and 'overlapping views' in out


def test_a_zip_bomb_member_is_refused(tmp_path):
    n = 1 << 25  # 128 MB of zeros deflates to ~130 kB
    pkl = _program(_dict(w=_tensor(_storage('0', n), 0, (n,), (1,))))
    path = _zip(tmp_path / 'bomb.pth', pkl, {'0': bytes(4 * n)}, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(WeightLoadError, match='inflates'):
        read_checkpoint(path)


def test_unknown_byte_orders_are_refused(tmp_path):
    path = _zip(tmp_path / 'bo.pth', _program(_dict()))
    with zipfile.ZipFile(path, 'a') as z:
        z.writestr('archive/byteorder', 'BIG-ENDIAN')
    with pytest.raises(WeightLoadError, match='unknown byte order'):
        read_checkpoint(path)


def test_build_cannot_change_the_loader_for_later_files(tmp_path):
    """BUILD with a slot state does setattr on what find_class returned: the Tensor class and the
    helper functions. Those must belong to one load only."""
    slot = b'N' + _dict(injected=_str('yes'), __defaults__=_tuple(_int(7))) + b'\x86'  # (None, {...})
    got = read_checkpoint(_zip(tmp_path / 'cls.pth', _program(_dict(a=_global('torch', 'Tensor') + slot + b'b'))))
    assert got['a'].injected == 'yes'  # set on this load's own class only
    try:  # a partial refuses such a state: the file is refused, or loads; the module is unchanged
        read_checkpoint(_zip(tmp_path / 'fn.pth',
                             _program(_dict(b=_global('torch._utils', '_rebuild_parameter') + slot + b'b'))))
    except WeightLoadError:
        pass
    assert not any(hasattr(c, 'injected') for c in (checkpoint_io._TensorType, checkpoint_io._rebuild_parameter))
    assert checkpoint_io._rebuild_parameter.__defaults__ is None


def _safetensors(path, header, data):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack('<Q', len(raw)) + raw + data)
    return path


@pytest.mark.parametrize('header,match', [
    ({'a': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]},
      'b': {'dtype': 'F32', 'shape': [4], 'data_offsets': [8, 24]}}, 'overlap'),
    ({'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [-4, 0]}}, 'do not hold'),
    ({'a': {'dtype': 'F32', 'shape': [0], 'data_offsets': [8, 4]}}, 'do not hold'),
    ({'a': {'dtype': 'F32', 'shape': [-1], 'data_offsets': [0, 4]}}, 'shape'),
    ({'a': {'dtype': 'F32', 'shape': [3], 'data_offsets': [0, 8]}}, 'do not hold'),
    ({'a': {'dtype': 'F8_E4M3', 'shape': [1], 'data_offsets': [0, 1]}}, 'not one this reader knows'),
    ({'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0.0, 4.0]}}, 'shape'),
    ([1, 2], 'not a JSON object'),
], ids=['overlap', 'negative_offset', 'start_after_end', 'negative_shape', 'size_mismatch', 'unknown_dtype',
        'float_offsets', 'header_is_a_list'])
def test_lying_safetensors_headers_are_refused(tmp_path, header, match):
    path = _safetensors(tmp_path / 'x.safetensors', header, bytes(32))
    with pytest.raises(WeightLoadError, match=match):
        read_checkpoint(path)


def test_a_valid_safetensors_file_still_loads(tmp_path):
    data = np.arange(6, dtype=np.float32).tobytes() + np.arange(2, dtype=np.int64).tobytes()
    header = {'__metadata__': {'format': 'pt'}, 'w': {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [0, 24]},
              'i': {'dtype': 'I64', 'shape': [2], 'data_offsets': [24, 40]}}
    got = read_checkpoint(_safetensors(tmp_path / 'ok.safetensors', header, data))
    assert got['w'].tolist() == [[0, 1, 2], [3, 4, 5]] and got['i'].tolist() == [0, 1]
