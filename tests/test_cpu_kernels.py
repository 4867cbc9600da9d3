"""The fused CPU kernels (util_mindspore/cpu_kernels.py) against torch's own CPU operators.

Each operator's forward and backward run beside the torch function it replaces (F.layer_norm,
x + b, F.gelu, softmax, timm's q/k/v reshape-permute-unbind) on the same inputs, in GRAPH and
PyNative mode, including sizes that are not multiples of the vector width. The library build,
its cache, and the fallback when no compiler is available are exercised for real (g++).
"""
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

from util_mindspore import cpu_kernels as K
from tests.helpers import ms_mode, avx512_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = [pytest.param(ms.PYNATIVE_MODE, id="pynative"), pytest.param(ms.GRAPH_MODE, id="graph")]

pytestmark = pytest.mark.skipif(ms.get_context("device_target") != "CPU", reason="CPU kernels")


def test_library_builds_where_a_compiler_exists():
    # CI and this project's machines have g++: there the fused path must really be on, or the
    # parity tests below and in test_models.py would silently test only the fallback.
    if shutil.which(os.environ.get("CXX") or "g++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert K.enabled(), K.status()
    assert os.path.isfile(K.library_path())
    assert K.status().startswith("fused CPU kernels: on")


class _Apply(nn.Cell):
    """Calls op(*inputs, *consts); grads of every input for a given sensitivity of every output."""

    def __init__(self, op, *consts):
        super().__init__()
        self.op = op
        self.consts = consts

    def construct(self, *xs):
        return self.op(*xs, *self.consts)


class _Grad(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.grad = ops.GradOperation(get_all=True, sens_param=True)

    def construct(self, *args):
        return self.grad(self.net)(*args)


def _run(op, consts, inputs, n_out, torch_fn, seed=0):
    """(our outputs, our input grads, torch outputs, torch input grads) for random output sens."""
    import torch
    rs = np.random.RandomState(seed)
    net = _Apply(op, *consts)
    outs = net(*[ms.Tensor(a) for a in inputs])
    outs = outs if isinstance(outs, tuple) else (outs,)
    sens = [rs.standard_normal(o.shape).astype(np.float32) for o in outs[:n_out]]
    ms_sens = tuple(ms.Tensor(s) for s in sens) + tuple(ops.zeros_like(o) for o in outs[n_out:])
    grads = _Grad(net)(*[ms.Tensor(a) for a in inputs], ms_sens if len(outs) > 1 else ms_sens[0])
    tin = [torch.tensor(a, requires_grad=True) for a in inputs]
    tout = torch_fn(*tin)
    tout = tout if isinstance(tout, tuple) else (tout,)
    torch.autograd.backward(tout, [torch.tensor(s) for s in sens])
    return ([o.asnumpy() for o in outs[:n_out]], [g.asnumpy() for g in grads[:len(inputs)]],
            [t.detach().numpy() for t in tout], [t.grad.numpy() for t in tin])


def _close(ours, ref, rtol, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, what
    err = np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= rtol, f'{what}: max error {err:.3g} of max |ref| (allowed {rtol})'


SHAPES = [pytest.param((3, 5, 40), id="3x5x40"), pytest.param((2, 197, 64), id="2x197x64"),
          pytest.param((7, 33), id="7x33")]


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_matches_torch(mode, shape):
    import torch
    rs = np.random.RandomState(1)
    d = shape[-1]
    x = (rs.standard_normal(shape) * 3 + 1).astype(np.float32)
    w, b = rs.standard_normal(d).astype(np.float32), rs.standard_normal(d).astype(np.float32)
    with ms_mode(mode):
        outs, grads, touts, tgrads = _run(K.layer_norm_op(), (K.scalar(1e-6),), [x, w, b], 1,
                                          lambda x, w, b: torch.nn.functional.layer_norm(x, (d,), w, b, 1e-6))
    _close(outs[0], touts[0], 2e-6, 'y')
    for name, g, tg in zip(('dx', 'dweight', 'dbias'), grads, tgrads):
        _close(g, tg, 5e-6, name)


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_add_and_bias_gelu_match_torch(mode, shape):
    import torch
    rs = np.random.RandomState(2)
    x = (rs.standard_normal(shape) * 3).astype(np.float32)
    b = rs.standard_normal(shape[-1]).astype(np.float32)
    with ms_mode(mode):
        add = _run(K.bias_add_op(), (), [x, b], 1, lambda x, b: x + b)
        gelu = _run(K.bias_gelu_op(), (), [x, b], 1, lambda x, b: torch.nn.functional.gelu(x + b))
        plain = _run(K.gelu_op(), (), [x], 1, lambda x: torch.nn.functional.gelu(x))
    outs, grads, touts, tgrads = add
    np.testing.assert_array_equal(outs[0], touts[0])  # one float add: bit-identical
    np.testing.assert_array_equal(grads[0], tgrads[0])
    _close(grads[1], tgrads[1], 2e-6, 'bias_add dbias')
    outs, grads, touts, tgrads = gelu
    _close(outs[0], touts[0], 1e-6, 'bias_gelu y')
    _close(grads[0], tgrads[0], 1e-6, 'bias_gelu dx')
    _close(grads[1], tgrads[1], 2e-6, 'bias_gelu dbias')
    outs, grads, touts, tgrads = plain
    _close(outs[0], touts[0], 1e-6, 'gelu y')
    _close(grads[0], tgrads[0], 1e-6, 'gelu dx')


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES)
def test_softmax_matches_torch(mode):
    import torch
    rs = np.random.RandomState(3)
    x = (rs.standard_normal((2, 3, 17, 197)) * 6).astype(np.float32)
    x[0, 0, 0, :5] = [80.0, -80.0, 0.0, 79.0, -1e4]  # large logits: max subtraction, exp underflow
    with ms_mode(mode):
        outs, grads, touts, tgrads = _run(K.softmax_op(), (), [x], 1, lambda x: torch.softmax(x, -1))
    _close(outs[0], touts[0], 1e-6, 'y')
    _close(grads[0], tgrads[0], 2e-6, 'dx')
    assert np.all(np.isfinite(outs[0]))


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES)
def test_softmax_and_attention_propagate_nan_and_inf_as_torch(mode):
    """A NaN or Inf score gives NaN as in torch (a diverging run must not look finite): the
    AVX-512 exp used to clamp NaN to -87, which made NaN scores ~0 probabilities and an Inf score
    a uniform row."""
    import torch
    x = np.zeros((4, 37), np.float32)
    x[0, 3] = np.nan
    x[1, 5] = np.inf
    x[2, :] = -np.inf
    x[3, :] = np.linspace(-3, 3, 37)
    with ms_mode(mode):
        got = _Apply(K.softmax_op())(ms.Tensor(x)).asnumpy()
        b, n, heads, hd = 1, 5, 2, 4
        qkv = np.random.RandomState(0).standard_normal((b, n, 3 * heads * hd)).astype(np.float32)
        qkv[0, 2, 0] = np.inf  # a q element of head 0: its scores overflow
        out = _Apply(K.attention_recompute_op(heads), K.scalar(hd ** -0.5), K.scalar(float(heads)))(
            ms.Tensor(qkv)).asnumpy()
    ref = torch.softmax(torch.from_numpy(x), -1).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(got[:3]).all() and np.isfinite(got[3]).all()
    _close(got[3], ref[3], 1e-6, 'finite row')
    t = torch.from_numpy(qkv).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    tout = torch.nn.functional.scaled_dot_product_attention(t[0], t[1], t[2]).transpose(1, 2).reshape(b, n, -1)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(tout.numpy()))
    assert np.isnan(out).any()


_EMPTY_CHILD = textwrap.dedent('''
    import sys, numpy as np, mindspore as ms
    sys.path.insert(0, {root!r})
    ms.set_device("CPU")
    from util_mindspore import cpu_kernels as K
    assert K.enabled(), K.status()
    T = lambda *shape: ms.Tensor(np.zeros(shape, np.float32))
    print(K.softmax_op()(T(4, 0)).shape, K.softmax_op()(T(0, 7)).shape)
    print(K.bias_add_op()(T(4, 0), T(0)).shape, K.row_scale_op()(T(0, 3), T(0)).shape)
    print(K.layer_norm_op()(T(0, 8), T(8), T(8), K.scalar(1e-6))[0].shape)
    try:
        K.layer_norm_op()(T(2, 8), T(8), T(1), K.scalar(1e-6))[0].asnumpy()  # beta of the wrong size
        print("no error")
    except RuntimeError:
        print("refused")
    print("done")
''')


def test_empty_tensors_and_bad_shapes_never_crash_the_process(tmp_path):
    """MindSpore launches custom operators on empty tensors: a division by the empty last axis
    used to kill the process (SIGFPE); a beta of the wrong size was read out of bounds."""
    if not K.enabled():
        pytest.skip(K.status())
    script = tmp_path / 'empty.py'
    script.write_text(_EMPTY_CHILD.format(root=ROOT))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == 'done' and lines[-2] == 'refused', proc.stdout


_FORK_CHILD = textwrap.dedent('''
    import os, sys, numpy as np, mindspore as ms
    sys.path.insert(0, {root!r})
    ms.set_device("CPU")
    from util_mindspore import cpu_kernels as K
    assert K.enabled(), K.status()
    import ctypes
    lib = ctypes.CDLL(K.library_path())
    x = ms.Tensor(np.random.RandomState(0).standard_normal((64, 197, 200)).astype(np.float32))
    b = ms.Tensor(np.zeros(200, np.float32))
    y = K.bias_gelu_op()(x, b).asnumpy()  # the pool's workers are running now
    pid = os.fork()
    if pid == 0:  # the child has no pool workers: its calls must run inline, not wait for them
        signal_alarm = __import__("signal").alarm(60)
        out = np.zeros((64 * 197, 200), np.float32)
        src = np.ascontiguousarray(y.reshape(-1, 200))
        shapes = (ctypes.c_int64 * 2)(64 * 197, 200), (ctypes.c_int64 * 2)(64 * 197, 200)
        params = (ctypes.c_void_p * 2)(src.ctypes.data, out.ctypes.data)
        ndims = (ctypes.c_int * 2)(2, 2)
        shp = (ctypes.POINTER(ctypes.c_int64) * 2)(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in shapes])
        dts = (ctypes.c_char_p * 2)(b"float32", b"float32")
        rc = lib.RfSoftmaxFwd(2, params, ndims, shp, dts, None, None)
        os._exit(0 if rc == 0 and np.allclose(out.sum(-1), 1, atol=1e-4) else 3)
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status))
''')


def test_a_forked_child_runs_the_kernels_inline(tmp_path):
    """fork() copies only the calling thread: a child that calls a kernel must not wait forever
    for pool workers it does not have (it used to hang)."""
    if not K.enabled():
        pytest.skip(K.status())
    script = tmp_path / 'fork.py'
    script.write_text(_FORK_CHILD.format(root=ROOT))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'child 0' in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_the_temporary_build_folder_must_be_private(tmp_path):
    shared = tmp_path / 'shared'
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(OSError, match='not a private folder'):
        K._check_private(str(shared))
    link = tmp_path / 'link'
    link.symlink_to(shared)
    with pytest.raises(OSError, match='not a private folder'):
        K._check_private(str(link))
    mine = tmp_path / 'mine'
    mine.mkdir(mode=0o700)
    K._check_private(str(mine))


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES)
def test_qkv_split_matches_timm_reshape_permute(mode):
    import torch
    rs = np.random.RandomState(4)
    b, n, heads, hd = 2, 5, 3, 8
    qkv = rs.standard_normal((b, n, 3 * heads * hd)).astype(np.float32)
    scale = hd ** -0.5

    def timm_split(t):  # timm 0.9 Attention.forward, then q * scale
        q, k, v = t.reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        return q * scale, k, v

    with ms_mode(mode):
        outs, grads, touts, tgrads = _run(K.qkv_split_op(heads), (K.scalar(scale),), [qkv], 3, timm_split)
    for o, t in zip(outs, touts):
        np.testing.assert_array_equal(o, t)
    np.testing.assert_array_equal(grads[0], tgrads[0])


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [pytest.param((2, 197, 48), id="2x197x48"), pytest.param((5, 33), id="5x33")])
def test_linear_matches_torch_linear(mode, shape):
    import torch
    if not K.linear_available():
        pytest.skip(K.status())
    rs = np.random.RandomState(6)
    k, n = shape[-1], 70
    x = rs.standard_normal(shape).astype(np.float32)
    w = (rs.standard_normal((n, k)) * 0.1).astype(np.float32)
    b = rs.standard_normal(n).astype(np.float32)
    with ms_mode(mode):
        outs, grads, touts, tgrads = _run(K.linear_op(), (), [x, w, b], 1, torch.nn.functional.linear)
    _close(outs[0], touts[0], 2e-6, 'y')
    for name, g, tg in zip(('dx', 'dweight', 'dbias'), grads, tgrads):
        _close(g, tg, 2e-6, name)


def _bf16(a):
    """Round float32 to bfloat16 (nearest even), returned as float64 for an exact reference."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("save", [True, False], ids=["saves_xb", "no_save"])
def test_bf16_linear_is_bf16_inputs_with_fp32_accumulation(mode, save):
    if not K.linear_available(bf16=True):
        pytest.skip(K.status())
    rs = np.random.RandomState(7)
    m, k, n = 37, 96, 50
    x = rs.standard_normal((m, k)).astype(np.float32)
    w = (rs.standard_normal((n, k)) * 0.1).astype(np.float32)
    b = rs.standard_normal(n).astype(np.float32)
    dy = rs.standard_normal((m, n)).astype(np.float32)
    with ms_mode(mode):
        net = _Apply(K.linear_op(bf16=True, save_bf16=save))
        if save:
            y, xb = net(ms.Tensor(x), ms.Tensor(w), ms.Tensor(b))
            # the second output is x rounded to bf16, what the backward keeps instead of x
            assert xb.dtype == ms.bfloat16 and xb.shape == (m, k)
            np.testing.assert_array_equal(xb.float().asnumpy(), _bf16(x))
            sens = (ms.Tensor(dy), ops.zeros_like(xb))
        else:
            y, sens = net(ms.Tensor(x), ms.Tensor(w), ms.Tensor(b)), ms.Tensor(dy)
        y = y.asnumpy()
        dx, dw, db = _Grad(net)(ms.Tensor(x), ms.Tensor(w), ms.Tensor(b), sens)
    # exact products of the rounded inputs, summed in float64: only fp32 accumulation order differs
    _close(y, _bf16(x) @ _bf16(w).T + b, 1e-6, 'y')
    _close(dx.asnumpy(), _bf16(dy) @ _bf16(w), 1e-6, 'dx')
    _close(dw.asnumpy(), _bf16(dy).T @ _bf16(x), 1e-6, 'dweight')
    _close(db.asnumpy(), dy.astype(np.float64).sum(0), 1e-6, 'dbias')
    # and it is really bf16: the fp32 product differs by far more than the accumulation error
    assert np.max(np.abs(y - (x.astype(np.float64) @ w.T + b))) > 1e-4


class _Dense(nn.Cell):
    """y = linear_op(x, weight, bias) with weight and bias as Parameters (as in the model)."""

    def __init__(self, w, b, save):
        super().__init__()
        self.op = K.linear_op(bf16=True, save_bf16=save)
        self.save = save
        self.weight = ms.Parameter(ms.Tensor(w), name='weight')
        self.bias = ms.Parameter(ms.Tensor(b), name='bias')

    def construct(self, x):
        if self.save:
            return self.op(x, self.weight, self.bias)[0]
        return self.op(x, self.weight, self.bias)


class _Assign(nn.Cell):
    """param <- value in place (what an optimizer step does to a weight's memory)."""

    def __init__(self, param):
        super().__init__()
        self.param = param

    def construct(self, value):
        return ops.assign(self.param, value)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("save", [True, False], ids=["saves_xb", "no_save"])
def test_frozen_weights_pack_each_bf16_weight_once_with_the_same_values(mode, save, monkeypatch):
    """Inside frozen_weights() (evaluation) the bf16 Linear forward packs its weight once for
    oneDNN's matmul primitive and reuses it: bf16 inputs, fp32 accumulation and bias, as the GEMM
    path; a weight changed inside the block is packed again; leaving the block frees the copies."""
    if not K.linear_available(bf16=True):
        pytest.skip(K.status())
    monkeypatch.setitem(K._state, 'bf16_matmul', True)
    rs = np.random.RandomState(11)
    k, n = 96, 70
    w = (rs.standard_normal((n, k)) * 0.1).astype(np.float32)
    w2 = (rs.standard_normal((n, k)) * 0.1).astype(np.float32)
    b = rs.standard_normal(n).astype(np.float32)
    xs = [rs.standard_normal(shape).astype(np.float32) for shape in ((37, k), (2, 197, k), (37, k))]
    with ms_mode(mode):
        net = _Dense(w, b, save)
        outside = [net(ms.Tensor(x)).asnumpy() for x in xs[:1]]
        s0 = K.weight_cache_stats()
        with K.frozen_weights():
            with K.frozen_weights():  # nested blocks: the outermost one decides
                ys = [net(ms.Tensor(x)).asnumpy() for x in xs]
            s1 = K.weight_cache_stats()
            _Assign(net.weight)(ms.Tensor(w2))  # changed in place inside the block: packed again
            y2 = net(ms.Tensor(xs[0])).asnumpy()
            s2 = K.weight_cache_stats()
        s3 = K.weight_cache_stats()
        net(ms.Tensor(xs[0])).asnumpy()
        s4 = K.weight_cache_stats()
    for x, y in zip(xs, ys):
        _close(y, _bf16(x) @ _bf16(w).T + b, 1e-6, f'y {x.shape}')
    _close(y2, _bf16(xs[0]) @ _bf16(w2).T + b, 1e-6, 'y after the weight changed')
    _close(ys[0], outside[0], 1e-6, 'packed vs GEMM path')
    assert s1['calls'] - s0['calls'] == 3 and s1['packs'] - s0['packs'] == 1  # three forwards, one pack
    assert s1['weights'] == 1 and s1['bytes'] >= 2 * n * k
    # same memory, new values: the fingerprint notices, and the copy is replaced
    assert s2["packs"] - s1["packs"] == 1 and s2["weights"] == 1
    assert s3['weights'] == 0 and s3['bytes'] == 0  # freed on leaving the block
    assert s4['calls'] == s3['calls']  # outside a block the GEMM path runs


def _tiny_eval_model(**kwargs):
    from tests.helpers import tiny_vit
    m = tiny_vit(global_pool=True, **kwargs)
    m.set_train(False)
    return m, ms.Tensor(np.random.RandomState(5).standard_normal((2, 3, 32, 32)).astype(np.float32))


def test_weights_packed_in_place_are_refused_by_every_other_reader(tmp_path, monkeypatch, capfd):
    """While fp32 weights are packed in place (inside frozen_weights(model)) nothing may read them
    as plain weights: checkpoint saving refuses with a clear error and writes nothing, the backward
    and the bf16 forward fail with a message saying why, instead of computing with scrambled
    weights. After the block the same gradients as before come back, and the same bf16 call works."""
    if not K.linear_available():
        pytest.skip(K.status())
    from engine_finetune_mindspore import NetWithLoss
    from util_mindspore.checkpoint import save_checkpoint_atomic
    monkeypatch.setitem(K._state, 'bf16_matmul', False)
    refused = r'RfLinear(Bf16NoSave)?(Fwd|Bwd)\)? is 5'
    with ms_mode(ms.PYNATIVE_MODE):
        m, x = _tiny_eval_model()
        y = ms.Tensor(np.array([0, 2], np.int32))
        grad_fn = ms.value_and_grad(NetWithLoss(m), None, m.trainable_params())
        g0 = [g.asnumpy() for g in grad_fn(x, y)[1]]
        qkv = m.blocks[0].attn.qkv
        qkv_plain = qkv.weight.asnumpy().copy()
        bf16 = K.linear_available(bf16=True)
        bf16_linear = K.linear_op(bf16=True, save_bf16=False) if bf16 else None
        rows = ms.Tensor(np.random.RandomState(6).standard_normal((5, 32)).astype(np.float32))
        bf16_before = bf16_linear(rows, qkv.weight, qkv.bias).asnumpy() if bf16 else None
        path = tmp_path / 'inside.ckpt'
        capfd.readouterr()
        with K.frozen_weights(m) as frozen:
            if frozen.packed == 0:
                pytest.skip('no Linear shape of the tiny model packs in place on this CPU')
            assert K.packed_in_place() == frozen.packed
            with pytest.raises(RuntimeError, match='packed in place'):
                save_checkpoint_atomic(m, str(path))
            with pytest.raises(RuntimeError, match=refused):
                grad_fn(x, y)[1][0].asnumpy()
            assert 'the Linear backward refused' in capfd.readouterr().err
            if bf16 and not np.array_equal(qkv.weight.asnumpy(), qkv_plain):  # (qkv is packed)
                with pytest.raises(RuntimeError, match=refused):
                    bf16_linear(rows, qkv.weight, qkv.bias).asnumpy()
                assert 'the bf16 Linear forward refused' in capfd.readouterr().err
        assert K.packed_in_place() == 0
        assert not path.exists() and not list(tmp_path.iterdir())
        g1 = [g.asnumpy() for g in grad_fn(x, y)[1]]
        if bf16:
            assert np.array_equal(bf16_linear(rows, qkv.weight, qkv.bias).asnumpy(), bf16_before)
        save_checkpoint_atomic(m, str(path))
    for a, b in zip(g0, g1):
        assert np.array_equal(a, b)
    assert path.exists()


@pytest.mark.parametrize("off", ["0", "off", "false", "no"])
def test_weights_packed_in_place_are_restored_on_an_exception_and_only_when_it_pays(off, monkeypatch):
    if not K.linear_available():
        pytest.skip(K.status())
    monkeypatch.setitem(K._state, 'bf16_matmul', False)
    m, x = _tiny_eval_model()
    ref = m(x).asnumpy()
    before = [p.asnumpy().copy() for p in m.get_parameters()]
    with pytest.raises(KeyError):
        with K.frozen_weights(m) as outer:
            packed = outer.packed
            assert K.packed_in_place() == packed and (packed == 9 or not avx512_cpu())
            with K.frozen_weights(m) as inner:  # nested: the outermost block packs, once
                assert inner.packed == 0 and K.packed_in_place() == packed
            assert K.packed_in_place() == packed
            raise KeyError('interrupted evaluation')
    assert K.packed_in_place() == 0
    assert all(np.array_equal(a, p.asnumpy()) for a, p in zip(before, m.get_parameters()))
    assert np.array_equal(m(x).asnumpy(), ref)
    # fewer than 4 forwards: the reorders would cost more than they save
    with K.frozen_weights(m, batches=3):
        assert K.packed_in_place() == 0
    with K.frozen_weights(m, batches=4):
        assert K.packed_in_place() == packed
    monkeypatch.setenv(K.ENV_PACK, off)
    with K.frozen_weights(m):
        assert K.packed_in_place() == 0
    monkeypatch.delenv(K.ENV_PACK)
    # --cpu_bf16 keeps its own packed bf16 copies and never packs fp32 weights in place
    monkeypatch.setitem(K._state, 'bf16_matmul', True)
    with K.frozen_weights(m):
        assert K.packed_in_place() == 0


def test_verify_restores_weights_that_the_packed_forward_did_not_read():
    """FrozenWeights.verify() after the first forward: a packed weight that the packed Linear path
    did not read (here: the forward ran on another model) means something else read it as a plain
    weight: every weight is restored, a warning says so, and verify() is False (recompute)."""
    if not K.linear_available():
        pytest.skip(K.status())
    m, x = _tiny_eval_model()
    other, _ = _tiny_eval_model()
    before = [p.asnumpy().copy() for p in m.get_parameters()]
    with K.frozen_weights(m) as frozen:
        if frozen.packed == 0:
            pytest.skip('no Linear shape of the tiny model packs in place on this CPU')
        other(x).asnumpy()
        with pytest.warns(RuntimeWarning, match='not read by the packed forward'):
            assert frozen.verify() is False
        assert K.packed_in_place() == 0 and frozen.packed == 0
        assert all(np.array_equal(a, p.asnumpy()) for a, p in zip(before, m.get_parameters()))
        assert frozen.verify() is True  # once
    with K.frozen_weights(m) as frozen:
        m(x).asnumpy()
        assert frozen.verify() is True and K.packed_in_place() == frozen.packed > 0


def test_packed_in_place_fallback_path_gives_the_same_logits():
    """A row count whose primitive cannot take the packed layout reorders W to a plain scratch copy
    for that call and runs dnnl_sgemm (forced here for every call)."""
    if not K.linear_available():
        pytest.skip(K.status())
    m, x = _tiny_eval_model(embed_dim=48)  # some shapes pack, some stay plain
    ref = m(x).asnumpy()
    lib = K._lib()
    lib.RfInPlaceForceFallback(1)
    try:
        with K.frozen_weights(m) as frozen:
            packed = frozen.packed
            c0 = K.in_place_stats()['calls']
            out = m(x).asnumpy()
            assert frozen.verify()
            used = K.in_place_stats()['calls'] - c0
    finally:
        lib.RfInPlaceForceFallback(0)
    assert used == packed and (0 < packed < 9 or not avx512_cpu())
    _close(out, ref, 1e-6, 'fallback vs dnnl_sgemm')


def test_frozen_weights_is_a_no_op_in_fp32_without_a_model(monkeypatch):
    if not K.linear_available():
        pytest.skip(K.status())
    monkeypatch.setitem(K._state, 'bf16_matmul', False)
    rs = np.random.RandomState(12)
    x = rs.standard_normal((5, 33)).astype(np.float32)
    w = rs.standard_normal((20, 33)).astype(np.float32)
    b = rs.standard_normal(20).astype(np.float32)
    op = _Apply(K.linear_op())
    s0 = K.weight_cache_stats()
    with K.frozen_weights():
        y = op(ms.Tensor(x), ms.Tensor(w), ms.Tensor(b)).asnumpy()
    assert K.weight_cache_stats() == s0
    _close(y, x.astype(np.float64) @ w.T + b, 2e-6, 'y')


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,n,heads,hd", [(2, 197, 3, 16), (3, 5, 2, 8)], ids=["2x197_3heads", "3x5_2heads"])
def test_attention_core_matches_timm(mode, b, n, heads, hd):
    import torch
    if not K.linear_available():
        pytest.skip(K.status())
    rs = np.random.RandomState(8)
    c = heads * hd
    qkv = (rs.standard_normal((b, n, 3 * c)) * 2).astype(np.float32)
    scale = hd ** -0.5

    def timm_core(t):  # timm 0.9 Attention.forward between qkv and proj (fused_attn=False branch)
        q, k, v = t.reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, n, c), attn

    with ms_mode(mode):
        outs, grads, touts, tgrads = _run(K.attention_op(heads), (K.scalar(scale),), [qkv], 1,
                                          lambda t: timm_core(t)[0])
        probs = _Apply(K.attention_op(heads), K.scalar(scale))(ms.Tensor(qkv))[1].asnumpy()
    _close(outs[0], touts[0], 2e-6, 'out')
    _close(probs, timm_core(torch.tensor(qkv))[1].numpy(), 2e-6, 'softmax probabilities')
    _close(grads[0], tgrads[0], 5e-6, 'dqkv')


@pytest.mark.parametrize("mode", MODES)
def test_bf16_attention_core_is_bf16_gemm_inputs_with_fp32_softmax(mode):
    if not K.linear_available(bf16=True):
        pytest.skip(K.status())
    rs = np.random.RandomState(11)
    b, n, heads, hd = 2, 37, 3, 16
    c = heads * hd
    qkv = (rs.standard_normal((b, n, 3 * c)) * 2).astype(np.float32)
    dout = rs.standard_normal((b, n, c)).astype(np.float32)
    scale = hd ** -0.5
    with ms_mode(mode):
        net = _Apply(K.attention_op(heads, bf16=True), K.scalar(scale))
        out, p = (t.asnumpy() for t in net(ms.Tensor(qkv)))
        dqkv = _Grad(net)(ms.Tensor(qkv), (ms.Tensor(dout), ops.zeros_like(ms.Tensor(p))))[0].asnumpy()
    # float64 reference on the bf16-rounded GEMM inputs; where the kernel rounds one of its own
    # fp32 intermediates (p, the softmax gradient) the reference rounds the kernel's value
    split = lambda t: t.reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # noqa: E731
    q, k, v = split(_bf16(qkv))
    s = scale * q @ k.transpose(0, 1, 3, 2)
    p_ref = np.exp(s - s.max(-1, keepdims=True))
    p_ref /= p_ref.sum(-1, keepdims=True)
    _close(p, p_ref, 2e-6, 'softmax probabilities')
    merge = lambda t: t.transpose(0, 2, 1, 3).reshape(b, n, c)  # noqa: E731
    _close(out, merge(_bf16(p) @ v), 1e-6, 'out')
    go = _bf16(dout).reshape(b, n, heads, hd).transpose(0, 2, 1, 3)
    dv = _bf16(p).transpose(0, 1, 3, 2) @ go
    dp = go @ v.transpose(0, 1, 3, 2)
    p64 = p.astype(np.float64)
    ds = p64 * (dp - (dp * p64).sum(-1, keepdims=True))
    dq, dk = scale * _bf16(ds) @ k, scale * _bf16(ds).transpose(0, 1, 3, 2) @ q
    dqkv_ref = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(b, n, 3 * c)
    got = dqkv.reshape(b, n, 3, c)
    ref = dqkv_ref.reshape(b, n, 3, c)
    _close(got[:, :, 2], ref[:, :, 2], 1e-6, 'dv')
    # ds is rounded to bf16 from the kernel's fp32 value, the reference's from float64: an element
    # on a rounding boundary may go to the neighbouring bf16 number (2^-8 relative; 1.4e-7 here)
    _close(got[:, :, :2], ref[:, :, :2], 1e-4, 'dq, dk')
    # and it is really bf16: the fp32 core differs by far more than the accumulation error
    with ms_mode(mode):
        out32 = _Apply(K.attention_op(heads), K.scalar(scale))(ms.Tensor(qkv))[0].asnumpy()
    assert np.max(np.abs(out - out32)) > 1e-4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bf16,save", [(False, False), (True, True), (True, False)],
                         ids=["fp32", "bf16", "bf16_no_save"])
def test_attention_recompute_op_is_the_core_without_p(mode, bf16, save):
    # the model's operator keeps no p: the same out as attention_op, bit for bit, and the same
    # gradient bit for bit (its backward recomputes each head's p exactly as the forward made it)
    if not K.linear_available(bf16=bf16):
        pytest.skip(K.status())
    rs = np.random.RandomState(12)
    b, n, heads, hd = 2, 37, 3, 16
    qkv = (rs.standard_normal((b, n, 3 * heads * hd)) * 2).astype(np.float32)
    dout = rs.standard_normal((b, n, heads * hd)).astype(np.float32)
    with ms_mode(mode):
        train = _Apply(K.attention_op(heads, bf16=bf16), K.scalar(hd ** -0.5))
        infer = _Apply(K.attention_recompute_op(heads, bf16=bf16, save_bf16=save), K.scalar(hd ** -0.5),
                       K.scalar(float(heads)))
        out, p = train(ms.Tensor(qkv))
        out_i = infer(ms.Tensor(qkv))
        d_train = _Grad(train)(ms.Tensor(qkv), (ms.Tensor(dout), ops.zeros_like(p)))[0].asnumpy()
        if bf16 and save:  # (out, qkv rounded to bf16: what the backward keeps instead of qkv)
            out_i, qkvb = out_i
            assert qkvb.dtype == ms.bfloat16
            np.testing.assert_array_equal(qkvb.float().asnumpy(), _bf16(qkv))
            sens = (ms.Tensor(dout), ops.zeros_like(qkvb))
        else:
            sens = ms.Tensor(dout)
        d_infer = _Grad(infer)(ms.Tensor(qkv), sens)[0].asnumpy()
    assert out_i.shape == out.shape == (b, n, heads * hd)
    np.testing.assert_array_equal(out_i.asnumpy(), out.asnumpy())
    np.testing.assert_array_equal(d_infer, d_train)
    assert np.abs(d_infer).max() > 0


@pytest.mark.torch
@pytest.mark.parametrize("mode", MODES)
def test_drop_path_operators_match_timm_drop_path(mode):
    import torch
    rs = np.random.RandomState(9)
    x = rs.standard_normal((4, 7, 5)).astype(np.float32)
    y = rs.standard_normal((4, 7, 5)).astype(np.float32)
    s = (np.array([1, 0, 1, 1], np.float32) / 0.8).astype(np.float32)  # mask / keep_prob
    scale = lambda t: t * torch.tensor(s).reshape(4, 1, 1)  # noqa: E731 - timm: x.div(keep) * mask
    with ms_mode(mode):
        ms_s = ms.Tensor(s)
        one = _run(K.row_scale_op(), (ms_s,), [y], 1, scale)
        res = _run(K.add_row_scale_op(), (ms_s,), [x, y], 1, lambda a, b: a + scale(b))
    outs, grads, touts, tgrads = one
    np.testing.assert_array_equal(outs[0], touts[0])
    np.testing.assert_array_equal(grads[0], tgrads[0])
    outs, grads, touts, tgrads = res
    np.testing.assert_allclose(outs[0], touts[0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(grads[0], tgrads[0])
    np.testing.assert_array_equal(grads[1], tgrads[1])
    assert np.all(grads[1][1] == 0)  # the dropped sample gets no gradient


def test_kernels_refuse_other_dtypes_loudly():
    # fp16 never reaches the kernels from the model (it checks dtype); called directly, the
    # kernel returns an error code and MindSpore raises instead of reading the buffer as fp32.
    op = K.softmax_op()
    with pytest.raises(Exception):
        op(ms.Tensor(np.ones((2, 3), np.float16))).asnumpy()


_CHILD = textwrap.dedent('''
    import sys, numpy as np, mindspore as ms
    sys.path.insert(0, {root!r})
    ms.set_device("CPU")
    from util_mindspore import cpu_kernels as K
    print(K.status())
    if K.enabled():
        print("spin_us", K.pool_spin_us())
        rs = np.random.RandomState(0)
        x = ms.Tensor(rs.standard_normal((64, 197, 200)).astype(np.float32))
        b = ms.Tensor(rs.standard_normal(200).astype(np.float32))
        y = K.bias_gelu_op()(x, b)
        np.save({out!r}, y.asnumpy())
    import models_vit_mindspore as models
    m = models.vit_tiny_patch16(img_size=32, num_classes=2)
    print("fused" if m.blocks[0].attn.fused else "ms_ops", m(ms.Tensor(np.ones((1, 3, 32, 32), np.float32))).shape)
''')


def _child(tmp_path, env, out='y.npy'):
    script = tmp_path / 'child.py'
    script.write_text(_CHILD.format(root=ROOT, out=str(tmp_path / out)))
    full_env = dict(os.environ, **env)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=full_env,
                          timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_results_do_not_depend_on_thread_count_and_cache_is_reused(tmp_path):
    if not K.enabled():
        pytest.skip(K.status())
    cache = tmp_path / 'cache'
    one = _child(tmp_path, {K.ENV_CACHE: str(cache), 'RETFOUND_KERNEL_THREADS': '1'}, 'one.npy')
    assert 'fused CPU kernels: on (' + str(cache) in one.stdout and 'fused' in one.stdout
    built = list(cache.rglob(K.LIB_NAME))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    three = _child(tmp_path, {K.ENV_CACHE: str(cache), 'RETFOUND_KERNEL_THREADS': '3', K.ENV_SPIN: '0'}, 'three.npy')
    assert 'fused' in three.stdout
    assert 'spin_us 300' in one.stdout and 'spin_us 0' in three.stdout  # the default, and the variable
    assert list(cache.rglob(K.LIB_NAME)) == built and built[0].stat().st_mtime_ns == mtime  # not rebuilt
    assert not [p for p in cache.rglob('*') if p.name.startswith('.build-')]  # no temporaries left
    np.testing.assert_array_equal(np.load(tmp_path / 'one.npy'), np.load(tmp_path / 'three.npy'))


def test_pool_polling_changes_no_result():
    """The worker threads poll RETFOUND_KERNEL_SPIN_US microseconds before blocking: calls that
    find them polling and calls that wake them give the same values, on many back-to-back calls of
    changing sizes (some too small to be split, some split over every thread)."""
    if not K.enabled():
        pytest.skip(K.status())
    rs = np.random.RandomState(5)
    xs = [rs.standard_normal((rows, 96)).astype(np.float32) for rows in (1, 3, 64, 500, 2, 1000)]
    b = rs.standard_normal(96).astype(np.float32)
    gelu, softmax = K.bias_gelu_op(), K.softmax_op()
    with ms_mode(ms.PYNATIVE_MODE):
        before = K.pool_spin_us()
        try:
            assert K.pool_spin_us(0) == before
            assert K.pool_spin_us(10 ** 9) == 0 and K.pool_spin_us() == 100000  # clamped to 0.1 s
            results = {}
            for spin in (0, 300, 0, 100000):
                K.pool_spin_us(spin)
                for _ in range(3):
                    for i, x in enumerate(xs):
                        got = (gelu(ms.Tensor(x), ms.Tensor(b)).asnumpy(), softmax(ms.Tensor(x)).asnumpy())
                        if i in results:
                            np.testing.assert_array_equal(got[0], results[i][0])
                            np.testing.assert_array_equal(got[1], results[i][1])
                        else:
                            results[i] = got
            x = xs[-1].astype(np.float64) + b
            ref = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
            np.testing.assert_allclose(results[len(xs) - 1][0], ref, rtol=1e-5, atol=1e-6)
        finally:
            K.pool_spin_us(before)


_PORTABLE_CHILD = textwrap.dedent('''
    import ctypes, sys, numpy as np, mindspore as ms
    sys.path.insert(0, {root!r})
    ms.set_device("CPU")
    from util_mindspore import cpu_kernels as K
    assert K.enabled(), K.status()
    print("avx512 build:", ctypes.CDLL(K.library_path()).RfAvx512Build())
    sys.path.insert(0, {tests!r})
    from test_cpu_kernels import _softmax_and_attention
    np.savez({out!r}, **_softmax_and_attention(K))
''')


def _softmax_and_attention(kernels):
    """Outputs of the softmax and attention operators on fixed inputs (rows of 197 and 33: a
    vector tail in both)."""
    rs = np.random.RandomState(13)
    b, n, heads, hd = 2, 197, 3, 16
    qkv = ms.Tensor((rs.standard_normal((b, n, 3 * heads * hd)) * 2).astype(np.float32))
    scale, h = kernels.scalar(hd ** -0.5), kernels.scalar(float(heads))
    out, p = kernels.attention_op(heads)(qkv, scale)
    return {'softmax197': kernels.softmax_op()(ms.Tensor(rs.standard_normal((3, 7, 197)).astype(np.float32) * 4)),
            'softmax33': kernels.softmax_op()(ms.Tensor(rs.standard_normal((5, 33)).astype(np.float32) * 4)),
            'out': out, 'p': p, 'infer': kernels.attention_recompute_op(heads)(qkv, scale, h)}


def test_portable_build_without_avx512_agrees_with_the_avx512_build(tmp_path):
    # CPUs without AVX-512 build the portable loops (#ifndef RF_AVX512): build them here too, with
    # -mno-avx512f appended by a compiler wrapper, and compare with this process's build.
    import ctypes
    cxx = shutil.which(os.environ.get("CXX") or "g++")
    if cxx is None or not K.linear_available():
        pytest.skip(K.status())
    if not ctypes.CDLL(K.library_path()).RfAvx512Build():
        pytest.skip("this machine's build is already the portable one")
    wrapper = tmp_path / 'cxx-no-avx512'
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = "--version" ] && exec {cxx} --version\nexec {cxx} "$@" -mno-avx512f\n')
    wrapper.chmod(0o755)
    script = tmp_path / 'portable.py'
    script.write_text(_PORTABLE_CHILD.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), out=str(tmp_path / 'p.npz')))
    env = dict(os.environ, CXX=str(wrapper), **{K.ENV_CACHE: str(tmp_path / 'cache')})
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'avx512 build: 0' in proc.stdout
    portable = np.load(tmp_path / 'p.npz')
    ours = {k: v.asnumpy() for k, v in _softmax_and_attention(K).items()}
    for name, value in ours.items():
        _close(portable[name], value, 2e-6, name)
    np.testing.assert_array_equal(portable['infer'], portable['out'])


def test_without_a_compiler_the_model_falls_back_with_a_clear_warning(tmp_path):
    proc = _child(tmp_path, {'CXX': str(tmp_path / 'no-such-g++'), K.ENV_CACHE: str(tmp_path / 'c')})
    assert 'fused CPU kernels: unavailable (no C++ compiler found' in proc.stdout
    assert 'no C++ compiler found (install g++ or set CXX)' in proc.stderr  # the RuntimeWarning
    assert 'ms_ops (1, 2)' in proc.stdout


def test_a_failing_compiler_falls_back_and_says_why(tmp_path):
    fake = tmp_path / 'bad-cxx'
    fake.write_text('#!/bin/sh\n[ "$1" = "--version" ] && { echo fake 1.0; exit 0; }\necho "cc1plus: fatal error: boom" >&2\nexit 1\n')
    fake.chmod(0o755)
    proc = _child(tmp_path, {'CXX': str(fake), K.ENV_CACHE: str(tmp_path / 'c')})
    assert 'could not build the fused CPU kernels' in proc.stdout and 'boom' in proc.stdout
    assert 'ms_ops (1, 2)' in proc.stdout
    assert not list((tmp_path / 'c').rglob('*.so'))  # nothing half-built left to load


def test_switch_off_by_environment(tmp_path):
    proc = _child(tmp_path, {K.ENV_SWITCH: '0'})
    assert f'fused CPU kernels: off ({K.ENV_SWITCH}=0)' in proc.stdout
    assert 'ms_ops (1, 2)' in proc.stdout


def test_read_only_home_builds_under_the_temporary_directory(tmp_path):
    if not K.enabled():
        pytest.skip(K.status())
    home = tmp_path / 'home'
    home.mkdir()
    (home / '.cache').write_text('not a directory')  # so ~/.cache/... cannot be created
    tmp = tmp_path / 'tmp'
    tmp.mkdir()
    env = {'HOME': str(home), 'XDG_CACHE_HOME': '', 'TMPDIR': str(tmp)}
    proc = _child(tmp_path, env)
    assert 'fused CPU kernels: on (' + str(tmp) in proc.stdout, proc.stdout
    assert list(tmp.rglob(K.LIB_NAME))


class _AdamWCell(nn.Cell):
    def __init__(self, n):
        super().__init__()
        self.p = ms.Parameter(ms.Tensor(np.linspace(-1, 1, n).astype(np.float32)), name='p')
        self.m = ms.Parameter(ms.Tensor(np.full(n, 0.01, np.float32)), name='m')
        self.v = ms.Parameter(ms.Tensor(np.full(n, 1e-4, np.float32)), name='v')
        self.op = K.adamw_op()

    def construct(self, g, sh, gh):
        before = self.p * 2.0  # a reader of the parameter the kernel will overwrite
        done = self.op(self.p, self.m, self.v, g, ops.depend(sh, before), gh)
        return before, done


@pytest.mark.parametrize("mode", MODES)
def test_adamw_op_updates_in_place_after_what_its_inputs_wait_for(mode):
    """The kernel writes param / exp_avg / exp_avg_sq in place (MindSpore passes the Parameters'
    own storage), and runs after an operator its step scalars wait for (ops.depend): the reader
    sees the old values. util_mindspore/optim.py makes the step scalars wait for all gradients."""
    if not K.enabled():
        pytest.skip(K.status())
    n = 70001  # not a multiple of the vector width or of the threads' ranges
    rs = np.random.RandomState(8)
    g = rs.standard_normal(n).astype(np.float32)
    lr, b1, b2, eps, bc1, bc2s, scale, wd = 2e-3, 0.9, 0.999, 1e-8, 0.19, 0.0447, 0.65, 0.05
    sh = np.array([lr, b1, b2, eps, bc1, bc2s], np.float32)
    gh = np.array([scale, wd], np.float32)
    with ms_mode(mode):
        cell = _AdamWCell(n)
        p0, m0, v0 = (x.asnumpy().copy() for x in (cell.p, cell.m, cell.v))
        before, done = cell(ms.Tensor(g), ms.Tensor(sh), ms.Tensor(gh))
        np.testing.assert_array_equal(before.asnumpy(), p0 * 2.0)
        assert float(done.asnumpy()[0]) == 1.0
        p1, m1, v1 = (x.asnumpy() for x in (cell.p, cell.m, cell.v))
    f = np.float32
    group_lr = f(sh[0]) * f(gh[0])
    m_ref = m0 + (f(1) - f(sh[1])) * (g - m0)
    v_ref = v0 * f(sh[2]) + (f(1) - f(sh[2])) * g * g
    p_ref = p0 * (f(1) - group_lr * f(gh[1])) - (group_lr / f(sh[4])) * (m_ref / (np.sqrt(v_ref) / f(sh[5]) + f(sh[3])))
    np.testing.assert_array_equal(m1, m_ref)
    np.testing.assert_array_equal(v1, v_ref)
    np.testing.assert_array_equal(p1, p_ref)
