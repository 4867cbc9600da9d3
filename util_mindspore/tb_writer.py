# --------------------------------------------------------
# RETFound for MindSpore: TensorBoard scalar logging (the original's torch SummaryWriter).
# Derived from: rmaphoh/RETFound main_finetune.py / engine_finetune.py (scalars loss/train, lr,
# loss/val, perf/* under --log_dir/{task}); the event-file format follows TensorFlow's TFRecord
# framing and the Event/Summary protos (tensorflow/core/util/event.proto, summary.proto).
# Written anew: tensorboardX when installed, else a small built-in scalar-only writer.
# --------------------------------------------------------
"""``SummaryWriter(log_dir)`` with add_scalar / flush / close, and a reader for tests.

Backend: tensorboardX (pinned in requirements_mindspore.txt) when importable; otherwise a
built-in writer producing the same records (TFRecord framing, masked CRC32C, hand-encoded
Event protos with ``simple_value`` scalars), which TensorBoard reads. ``read_scalars`` parses
either kind and verifies every CRC.
"""
import glob
import os
import socket
import struct
import time

# ---------------------------------------------------------------------------
# CRC32C (Castagnoli) and TFRecord framing
# ---------------------------------------------------------------------------


def _make_crc_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _make_crc_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frame(payload):
    header = struct.pack('<Q', len(payload))
    return (header + struct.pack('<I', masked_crc32c(header)) + payload
            + struct.pack('<I', masked_crc32c(payload)))


def read_records(path):
    """Payloads of a TFRecord file; raises ValueError on a CRC mismatch or a truncated record."""
    with open(path, 'rb') as f:
        data = f.read()
    out, pos = [], 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f'{path}: truncated record header at byte {pos}')
        header = data[pos:pos + 8]
        (length,) = struct.unpack('<Q', header)
        (hcrc,) = struct.unpack('<I', data[pos + 8:pos + 12])
        if hcrc != masked_crc32c(header):
            raise ValueError(f'{path}: length CRC mismatch at byte {pos}')
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(data):
            raise ValueError(f'{path}: truncated record at byte {pos}')
        payload = data[start:end]
        (dcrc,) = struct.unpack('<I', data[end:end + 4])
        if dcrc != masked_crc32c(payload):
            raise ValueError(f'{path}: data CRC mismatch in the record at byte {pos}')
        out.append(payload)
        pos = end + 4
    return out


# ---------------------------------------------------------------------------
# Minimal protobuf wire format (Event, Summary, Summary.Value with simple_value)
# ---------------------------------------------------------------------------


def _varint(n):
    n &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num, wire, payload):
    return _varint((num << 3) | wire) + payload


def _bytes_field(num, data):
    return _field(num, 2, _varint(len(data)) + data)


def encode_scalar_event(tag, value, step, wall_time):
    """Event{wall_time=1: double, step=2: int64, summary=5: Summary{value=1: Value{tag=1, simple_value=2: float}}}."""
    value_msg = _bytes_field(1, tag.encode('utf-8')) + _field(2, 5, struct.pack('<f', float(value)))
    summary = _bytes_field(1, value_msg)
    return (_field(1, 1, struct.pack('<d', wall_time)) + _field(2, 0, _varint(int(step)))
            + _bytes_field(5, summary))


def encode_version_event(wall_time):
    return _field(1, 1, struct.pack('<d', wall_time)) + _bytes_field(3, b'brain.Event:2')


def _parse(buf):
    """{field number: [raw values]} for one message (varints as ints, fixed as bytes)."""
    fields, pos = {}, 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _read_varint(buf, pos)
        elif wire == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f'unsupported protobuf wire type {wire}')
        fields.setdefault(num, []).append(val)
    return fields


def _read_varint(buf, pos):
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def decode_event(payload):
    """{'wall_time', 'step', 'file_version', 'scalars': [(tag, value)]} from an Event."""
    f = _parse(payload)
    step = f.get(2, [0])[-1]
    if step >= 1 << 63:
        step -= 1 << 64
    event = {'wall_time': struct.unpack('<d', f[1][-1])[0] if 1 in f else 0.0, 'step': step,
             'file_version': f[3][-1].decode() if 3 in f else None, 'scalars': []}
    for summary in f.get(5, []):
        for value in _parse(summary).get(1, []):
            v = _parse(value)
            if 2 in v:  # simple_value
                event['scalars'].append((v[1][-1].decode('utf-8'), struct.unpack('<f', v[2][-1])[0]))
    return event


def read_scalars(log_dir):
    """{tag: [(step, value), ...]} from every event file in log_dir (CRCs verified)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(log_dir, 'events.out.tfevents.*'))):
        for payload in read_records(path):
            event = decode_event(payload)
            for tag, value in event['scalars']:
                out.setdefault(tag, []).append((event['step'], value))
    return out


# ---------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------


class _BuiltinEventWriter:
    """Scalar-only event file writer (used when tensorboardX is not installed)."""

    def __init__(self, log_dir):
        os.makedirs(log_dir, exist_ok=True)
        now = time.time()
        name = f'events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}'
        self.path = os.path.join(log_dir, name)
        self._f = open(self.path, 'ab')
        self._f.write(_frame(encode_version_event(now)))
        self._f.flush()

    def add_scalar(self, tag, value, step):
        self._f.write(_frame(encode_scalar_event(tag, value, step, time.time())))

    def flush(self):
        self._f.flush()

    def close(self):
        if not self._f.closed:
            self._f.flush()
            self._f.close()


class SummaryWriter:
    """The subset of torch.utils.tensorboard.SummaryWriter RETFound uses.

    backend: 'auto' (tensorboardX if installed, else built-in), 'tensorboardX' or 'builtin'.
    """

    def __init__(self, log_dir, backend='auto'):
        self.log_dir = os.fspath(log_dir)
        if backend not in ('auto', 'tensorboardX', 'builtin'):
            raise ValueError(f"backend must be 'auto', 'tensorboardX' or 'builtin', got {backend!r}")
        self._writer = None
        if backend != 'builtin':
            try:
                from tensorboardX import SummaryWriter as _TBX
            except ImportError:
                if backend == 'tensorboardX':
                    raise
            else:
                self._writer = _TBX(logdir=self.log_dir)
                self.backend = 'tensorboardX'
        if self._writer is None:
            self._writer = _BuiltinEventWriter(self.log_dir)
            self.backend = 'builtin'

    def add_scalar(self, tag, value, step):
        if hasattr(value, 'asnumpy'):
            value = value.asnumpy()
        self._writer.add_scalar(tag, float(value), int(step))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
