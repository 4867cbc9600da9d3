# --------------------------------------------------------
# Tests for util_mindspore/misc.py (meters, log format, checkpoint save/resume, crash safety)
# and util_mindspore/tb_writer.py (event files read back with CRC checks).
# Behaviour reference: rmaphoh/RETFound util/misc.py.
# --------------------------------------------------------
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

import util_mindspore.misc as misc
from util_mindspore.optim import AdamW
from util_mindspore.tb_writer import SummaryWriter, read_records, read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- meters and log format

def test_smoothed_value_statistics():
    v = misc.SmoothedValue(window_size=4)
    for x in [5.0, 1.0, 3.0, 2.0, 4.0]:   # window keeps the last 4: [1, 3, 2, 4]
        v.update(x)
    assert v.median == 2.0                # lower middle value, as torch.median
    assert v.avg == pytest.approx(2.5)
    assert v.global_avg == pytest.approx(3.0)
    assert v.max == 4.0 and v.value == 4.0
    assert str(v) == '2.0000 (3.0000)'


@pytest.mark.torch
def test_smoothed_value_median_avg_equal_torch():
    import torch
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 20):
        values = [float(x) for x in rng.normal(size=n)]
        v = misc.SmoothedValue(window_size=20)
        for x in values:
            v.update(x)
        assert v.median == torch.tensor(values).median().item()
        assert v.avg == torch.tensor(values, dtype=torch.float32).mean().item()


def _run_logger(module, n, print_freq, capsys):
    logger = module.MetricLogger(delimiter='  ')
    logger.add_meter('lr', module.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    for i, _ in enumerate(logger.log_every(list(range(n)), print_freq, 'Epoch: [0]')):
        logger.update(loss=1.0 / (i + 1), lr=1e-3 * i)
    logger.synchronize_between_processes()
    print('Averaged stats:', logger)
    return capsys.readouterr().out.splitlines()


def test_metric_logger_format(capsys):
    lines = _run_logger(misc, 12, 5, capsys)
    assert len(lines) == 6  # steps 0, 5, 10, 11 (last), then Total time, then Averaged stats
    assert re.fullmatch(r'Epoch: \[0\]  \[ 0/12\]  eta: 0:00:00  lr: 0\.000000  loss: 1\.0000 \(1\.0000\)  '
                        r'time: \d+\.\d{4}  data: \d+\.\d{4}', lines[0]), lines[0]
    assert lines[3].startswith('Epoch: [0]  [11/12]')
    assert re.fullmatch(r'Epoch: \[0\] Total time: 0:00:00 \(\d+\.\d{4} s / it\)', lines[4]), lines[4]
    logger = misc.MetricLogger()
    logger.update(loss=ms.Tensor(np.float32(2.0)), acc=np.float64(0.5))
    assert logger.loss.global_avg == 2.0 and logger.acc.value == 0.5
    with pytest.raises(AttributeError):
        logger.nonexistent


def test_single_process_distributed_helpers(monkeypatch, capsys):
    for k in ('MS_ROLE', 'MS_WORKER_NUM', 'MS_SCHED_HOST'):
        monkeypatch.delenv(k, raising=False)
    import builtins
    original_print = builtins.print
    try:
        args = argparse.Namespace()
        misc.init_distributed_mode(args)
        assert args.distributed is False
        assert misc.get_rank() == 0 and misc.get_world_size() == 1 and misc.is_main_process()
        assert misc.all_reduce_mean(1.5) == 1.5
        labels, probs = misc.gather_predictions(np.arange(5), np.ones((5, 2)), num_samples=4)
        assert labels.tolist() == [0, 1, 2, 3] and probs.shape == (4, 2)
        print('hello')
        assert re.search(r'^\[\d\d:\d\d:\d\d\.\d+\] hello$', capsys.readouterr().out, re.M)
    finally:
        builtins.print = original_print


def test_read_log_skips_broken_lines(tmp_path):
    p = tmp_path / 'log.txt'
    p.write_text(json.dumps({'epoch': 0, 'val_score': 0.5}) + '\n{"epoch": 1, "val_sc\n')
    assert misc.read_log(str(p)) == [{'epoch': 0, 'val_score': 0.5}]
    assert misc.read_log(str(tmp_path / 'missing.txt')) == []


# ---------------------------------------------------------------- checkpoints

class _Net(nn.Cell):
    def __init__(self, hidden=8, classes=3):
        super().__init__()
        self.fc1 = nn.Dense(4, hidden, weight_init='normal', bias_init='zeros')
        self.head = nn.Dense(hidden, classes, weight_init='normal', bias_init='zeros')

    def construct(self, x):
        return self.head(self.fc1(x))


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), task='task', epochs=10, resume='', eval=False, start_epoch=0,
                lr=1e-3, model='tiny')
    base.update(kw)
    return argparse.Namespace(**base)


def _randomise(params, seed):
    rng = np.random.default_rng(seed)
    for p in params:
        p.set_data(ms.Tensor(rng.normal(size=p.shape).astype(np.float32) if p.shape else
                             np.float32(rng.integers(1, 100)), p.dtype))


def _values(params):
    return {p.name: p.asnumpy().copy() for p in params}


def _project_adamw(net):
    return AdamW([{'params': net.trainable_params(), 'lr_scale': 1.0, 'weight_decay': 0.05}], lr=1e-3)


def _experimental_adamw(net):
    from mindspore.experimental.optim import AdamW as ExpAdamW
    return ExpAdamW(net.trainable_params(), lr=1e-3)


@pytest.mark.parametrize('make_optimizer', [_project_adamw, _experimental_adamw])
def test_save_and_resume_round_trip(tmp_path, make_optimizer):
    net = _Net()
    opt = make_optimizer(net)
    state = misc._optimizer_state(opt, net)
    assert state and not {p.name for p in state} & {p.name for p in net.get_parameters()}
    _randomise(list(net.get_parameters()) + state, 0)
    args = _args(tmp_path)
    path = misc.save_model(args=args, epoch=4, model=net, model_without_ddp=net, optimizer=opt, loss_scaler=None,
                           mode='latest', extra={'max_score': 0.75, 'best_epoch': 3})
    assert path == os.path.join(str(tmp_path), 'task', 'checkpoint-latest.ckpt')
    assert os.listdir(os.path.dirname(path)) == ['checkpoint-latest.ckpt']  # no temp debris
    names = set(ms.load_checkpoint(path))
    assert {'optimizer.' + p.name for p in state} <= names

    net2 = _Net()
    opt2 = make_optimizer(net2)
    state2 = misc._optimizer_state(opt2, net2)
    _randomise(list(net2.get_parameters()) + state2, 1)
    args2 = _args(tmp_path, resume=path)
    meta = misc.load_model(args=args2, model_without_ddp=net2, optimizer=opt2, loss_scaler=None)
    assert args2.start_epoch == 5
    assert meta['epoch'] == 4 and meta['best_epoch'] == 3 and meta['max_score'] == pytest.approx(0.75)
    assert meta['args']['task'] == 'task' and meta['args']['epochs'] == 10
    for before, after in [(_values(net.get_parameters()), _values(net2.get_parameters())),
                          (_values(state), _values(state2))]:
        assert before.keys() == after.keys()
        for k in before:
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    assert misc.read_checkpoint_args(path)['epochs'] == 10


def test_best_checkpoint_has_model_epoch_args_only(tmp_path):
    net = _Net()
    opt = _project_adamw(net)
    args = _args(tmp_path)
    path = misc.save_model(args, 2, net, net, opt, None, 'best')
    ckpt = misc.load_checkpoint_checked(path)
    assert set(ckpt) == {p.name for p in net.get_parameters()} | {'epoch', 'args'}
    assert json.loads(ckpt['args'])['output_dir'] == str(tmp_path)
    # eval resume: model only, the epoch is not advanced
    args2 = _args(tmp_path, resume=path, eval=True)
    misc.load_model(args2, _Net(), None, None)
    assert args2.start_epoch == 0


def test_wrong_model_lists_names_and_shapes(tmp_path):
    net = _Net(hidden=8)
    path = misc.save_model(_args(tmp_path), 0, net, net, None, None, 'best')
    with pytest.raises(misc.CheckpointError, match=r'fc1\.weight: checkpoint \(8, 4\) vs model \(6, 4\)'):
        misc.load_model(_args(tmp_path, resume=path), _Net(hidden=6), None, None)

    class Bigger(_Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Dense(3, 3)
    with pytest.raises(misc.CheckpointError, match=r'missing \(2\).*extra\.weight'):
        misc.load_model(_args(tmp_path, resume=path), Bigger(), None, None)


def test_corrupt_truncated_missing_files_raise_clear_errors(tmp_path):
    net = _Net()
    path = misc.save_model(_args(tmp_path), 0, net, net, None, None, 'best')
    with open(path, 'rb') as f:
        data = f.read()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x04
    (tmp_path / 'flipped.ckpt').write_bytes(bytes(flipped))
    with pytest.raises(misc.CheckpointError, match='corrupt checkpoint'):
        misc.load_checkpoint_checked(str(tmp_path / 'flipped.ckpt'))
    for cut in (len(data) // 2, len(data) - 17, 0):
        (tmp_path / 'cut.ckpt').write_bytes(data[:cut])
        with pytest.raises(misc.CheckpointError, match='truncated|corrupt'):
            misc.load_checkpoint_checked(str(tmp_path / 'cut.ckpt'))
    with pytest.raises(misc.CheckpointError, match='checkpoint not found'):
        misc.load_model(_args(tmp_path, resume=str(tmp_path / 'nope.ckpt')), net, None, None)


def test_stale_temp_files_are_removed_on_next_save(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    target = tmp_path / 'w.ckpt'
    stale = [tmp_path / f'.w.ckpt.partial-{dead.pid}-deadbeef.ckpt', tmp_path / f'.w.ckpt.partial-{dead.pid}-deadbeef.tmp']
    for s in stale:
        s.write_bytes(b'garbage')
    live = tmp_path / f'.w.ckpt.partial-{os.getppid()}-cafe.ckpt'  # a live writer's file is left alone
    live.write_bytes(b'in progress')
    misc.save_checkpoint_atomic([{'name': 'w', 'data': ms.Tensor(np.ones(3, np.float32))}], str(target))
    assert not any(s.exists() for s in stale) and live.exists()
    assert ms.load_checkpoint(str(target), crc_check=True)['w'].asnumpy().tolist() == [1, 1, 1]


_SAVER = textwrap.dedent('''
    import sys, numpy as np, mindspore as ms
    sys.path.insert(0, {root!r})
    from util_mindspore.misc import save_checkpoint_atomic
    path, i = sys.argv[1], 0
    while True:
        data = ms.Tensor(np.full(300000, i, dtype=np.float32))
        save_checkpoint_atomic([{{'name': 'w', 'data': data}}], path, append_dict={{'version': i}})
        print(i, flush=True)
        i += 1
''')


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    script = tmp_path / 'saver.py'
    script.write_text(_SAVER.format(root=ROOT))
    rng = random.Random(0)
    n_proc, kills = 4, 0
    env = dict(os.environ, GLOG_v='3')
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f'c{k}.ckpt')], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=env) for k in range(n_proc)]
    try:
        for k, proc in enumerate(procs):
            first = proc.stdout.readline()   # one complete save, then kill at a random moment
            assert first.strip() == b'0', first
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            last_reported = int(([b'0'] + proc.stdout.read().split())[-1])
            ckpt = misc.load_checkpoint_checked(str(tmp_path / f'c{k}.ckpt'))
            version = int(ckpt['version'].asnumpy())
            w = ckpt['w'].asnumpy()
            assert version >= last_reported and np.all(w == version), (version, last_reported)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    assert kills == n_proc
    # whatever temp debris the kills left is removed by the next save to the same target
    for k in range(n_proc):
        misc.save_checkpoint_atomic([{'name': 'w', 'data': ms.Tensor(np.zeros(2, np.float32))}],
                                    str(tmp_path / f'c{k}.ckpt'))
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith('.')) == []


# ---------------------------------------------------------------- TensorBoard

@pytest.mark.parametrize('backend', ['tensorboardX', 'builtin'])
def test_summary_writer_scalars_read_back(tmp_path, backend):
    if backend == 'tensorboardX':
        pytest.importorskip('tensorboardX')
    log_dir = tmp_path / 'task'
    with SummaryWriter(str(log_dir), backend=backend) as w:
        assert w.log_dir == str(log_dir)
        w.add_scalar('loss/train', 0.5, 1000)
        w.add_scalar('lr', ms.Tensor(np.float32(1e-3)), 1000)
        w.add_scalar('perf/score', 0.25, -1)
        w.flush()
    scalars = read_scalars(str(log_dir))
    assert scalars['loss/train'] == [(1000, 0.5)]
    assert scalars['lr'][0][0] == 1000 and scalars['lr'][0][1] == pytest.approx(1e-3)
    assert scalars['perf/score'] == [(-1, 0.25)]
    # a flipped bit is detected by the record CRC
    (event_file,) = [p for p in log_dir.iterdir() if p.name.startswith('events.out.tfevents.')]
    data = bytearray(event_file.read_bytes())
    data[-6] ^= 0x01
    event_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match='CRC mismatch'):
        read_records(str(event_file))


def test_builtin_events_parse_with_tensorboardx_protos(tmp_path):
    event_pb2 = pytest.importorskip('tensorboardX.proto.event_pb2')
    with SummaryWriter(str(tmp_path), backend='builtin') as w:
        w.add_scalar('loss/val', 1.25, 7)
    (path,) = list(tmp_path.iterdir())
    events = []
    for payload in read_records(str(path)):
        e = event_pb2.Event()
        e.ParseFromString(payload)
        events.append(e)
    assert events[0].file_version == 'brain.Event:2'
    assert events[1].step == 7 and events[1].summary.value[0].tag == 'loss/val'
    assert events[1].summary.value[0].simple_value == 1.25


_DIST = textwrap.dedent('''
    import sys, argparse, numpy as np
    sys.path.insert(0, {root!r})
    import mindspore as ms
    ms.set_device("CPU")
    import util_mindspore.misc as misc
    args = argparse.Namespace()
    misc.init_distributed_mode(args)
    r = args.rank
    lg = misc.MetricLogger(); lg.update(loss=float(r)); lg.update(loss=float(r)); lg.synchronize_between_processes()
    idx = [0, 2, 4] if r == 0 else [1, 3, 0]   # 5 samples, DistributedSampler-style shards with padding
    L, P = misc.gather_predictions(np.array(idx), np.eye(5, dtype=np.float32)[idx], 5)
    print("RESULT", r, args.world_size, misc.all_reduce_mean(float(r + 1)), lg.loss.count, lg.loss.global_avg,
          L.tolist(), P.argmax(1).tolist(), force=True)
''')


@pytest.mark.slow
def test_msrun_two_workers_reduce_and_gather(tmp_path):
    (tmp_path / 'd.py').write_text(_DIST.format(root=ROOT))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    port = 18000 + os.getpid() % 1000
    rc = subprocess.run([os.path.join(os.path.dirname(sys.executable), 'msrun'), '--worker_num=2',
                         '--local_worker_num=2', '--master_addr=127.0.0.1', f'--master_port={port}', '--join=True',
                         f'--log_dir={tmp_path}', 'd.py'], cwd=tmp_path, env=env, capture_output=True, timeout=180)
    logs = ''.join((tmp_path / f'worker_{r}.log').read_text() for r in range(2))
    assert rc.returncode == 0, logs[-3000:]
    for r in range(2):
        assert f'RESULT {r} 2 1.5 4 0.5 [0, 1, 2, 3, 4] [0, 1, 2, 3, 4]' in logs


def test_a_torchrun_launch_is_refused_with_the_msrun_command(monkeypatch):
    """torchrun sets WORLD_SIZE/RANK, not msrun's variables: each process would otherwise train
    alone as its own rank 0 and write the same files."""
    from types import SimpleNamespace
    for k in ('MS_ROLE', 'MS_WORKER_NUM', 'MS_SCHED_HOST'):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('RANK', '1')
    with pytest.raises(SystemExit, match='not started by msrun.*msrun --worker_num=4'):
        misc.init_distributed_mode(SimpleNamespace())
    monkeypatch.setenv('WORLD_SIZE', '1')
    args = SimpleNamespace()
    misc.init_distributed_mode(args)
    assert args.distributed is False
