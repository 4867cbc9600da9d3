"""The compiled train step: accumulation, clipping, soft targets, non-finite loss."""
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import mindspore as ms

from engine_finetune_mindspore import Stepper, train_one_epoch, NetWithLoss
from util_mindspore.lr_decay import param_groups_lrd
from util_mindspore.optim import AdamW
from tests.helpers import tiny_vit, load_numpy_state, ms_mode


def _model_and_opt(seed=0):
    np.random.seed(seed)
    m = tiny_vit(global_pool=True)
    opt = AdamW(param_groups_lrd(m, 0.05, m.no_weight_decay(), 0.65), lr=1e-3)
    return m, opt


def _params(m):
    return {p.name: p.asnumpy().copy() for p in m.get_parameters()}


def test_accumulated_gradient_equals_the_union_batch_gradient():
    """k micro-batches of loss/k accumulate exactly the gradient of one union batch."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    with ms_mode(ms.GRAPH_MODE):
        m, o = _model_and_opt()
        m.set_train(True)
        s = Stepper(m, o, accum_iter=2)
        s.micro_step(ms.Tensor(x[:4]), ms.Tensor(y[:4]))
        s.micro_step(ms.Tensor(x[4:]), ms.Tensor(y[4:]))
        accumulated = [a.asnumpy() for a in s.micro_step.accum]
        union = ms.value_and_grad(NetWithLoss(m), None, o.parameters)(ms.Tensor(x), ms.Tensor(y))[1]
    for p, a, g in zip(o.parameters, accumulated, union):
        g = g.asnumpy()
        rel = np.linalg.norm(a - g) / max(np.linalg.norm(g), 1e-12)
        assert rel <= 1e-6, (p.name, rel)


@pytest.mark.parametrize("clip", [None, 0.05], ids=["noclip", "clip"])
def test_accumulation_steps_equal_union_batch_steps(clip):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    with ms_mode(ms.GRAPH_MODE):
        m1, o1 = _model_and_opt()
        s1 = Stepper(m1, o1, accum_iter=1, clip_grad=clip)
        m1.set_train(True)
        for lr in (1e-3, 2e-3):
            s1(x, y, lr, update=True)

        m2, o2 = _model_and_opt()
        s2 = Stepper(m2, o2, accum_iter=2, clip_grad=clip)
        m2.set_train(True)
        for lr in (1e-3, 2e-3):
            s2(x[:4], y[:4], lr, update=False)
            before = _params(m2)
            s2(x[4:], y[4:], lr, update=True)
        p1, p2 = _params(m1), _params(m2)
    # AdamW normalises the update (m / sqrt(v)): fp32 rounding in near-zero gradients shows up at
    # ~1e-6 of the parameters; 1e-5 is 1% of a single update at these learning rates.
    worst = max(float(np.max(np.abs(p1[k] - p2[k]))) for k in p1)
    assert worst <= 1e-5, worst
    moved = max(float(np.max(np.abs(before[k] - p2[k]))) for k in p2)
    assert moved > 1e-4  # the boundary micro-step really updated


def test_micro_steps_do_not_update_and_epoch_start_resets():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int32)
    with ms_mode(ms.GRAPH_MODE):
        m, o = _model_and_opt()
        s = Stepper(m, o, accum_iter=3)
        m.set_train(True)
        before = _params(m)
        s(x, y, 1e-3, update=False)
        assert all(np.array_equal(before[k], v) for k, v in _params(m).items())
        assert max(float(np.abs(a.asnumpy()).max()) for a in s.micro_step.accum) > 0
        s.reset_accumulation()  # optimizer.zero_grad() at the start of each epoch
        assert max(float(np.abs(a.asnumpy()).max()) for a in s.micro_step.accum) == 0


@pytest.mark.torch
def test_soft_target_loss_equals_torch_cross_entropy_on_probabilities():
    import torch
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((6, 3)).astype(np.float32)
    target = rng.dirichlet(np.ones(3), size=6).astype(np.float32)
    ref = torch.nn.CrossEntropyLoss()(torch.from_numpy(logits), torch.from_numpy(target)).item()

    class Fixed(ms.nn.Cell):
        def construct(self, x):
            return x

    net = NetWithLoss(Fixed(), soft_targets=True)
    got = float(net(ms.Tensor(logits), ms.Tensor(target)).asnumpy())
    assert abs(got - ref) <= 2e-6 * abs(ref)  # fp32 log-softmax rounding (~10 ulp)


class _Loader:
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.torch
def test_train_one_epoch_refuses_what_it_would_ignore():
    """The loss and the clipping are compiled into the Stepper: a criterion or a different
    max_norm passed as in the original's call would silently do nothing, so they are refused, and
    a missing stepper says what to pass."""
    import torch
    args = SimpleNamespace(accum_iter=1, lr=1e-3, min_lr=1e-6, warmup_epochs=1, epochs=2)
    batches = _Loader([(np.zeros((2, 3, 32, 32), np.float32), np.zeros(2, np.int32))])
    m, o = _model_and_opt()
    with pytest.raises(TypeError, match='needs stepper=Stepper'):
        train_one_epoch(m, None, batches, o, 'CPU', 0, None, None, None, args=args)
    s = Stepper(m, o, accum_iter=1, clip_grad=1.0)
    with pytest.raises(ValueError, match='criterion=CrossEntropyLoss would be ignored'):
        train_one_epoch(m, torch.nn.CrossEntropyLoss(label_smoothing=0.1), batches, o, 'CPU', 0, None, 1.0,
                        None, args=args, stepper=s)
    with pytest.raises(ValueError, match="max_norm=5.0 differs from the Stepper's clip_grad=1.0"):
        train_one_epoch(m, None, batches, o, 'CPU', 0, None, 5.0, None, args=args, stepper=s)


def test_non_finite_loss_stops_the_run(capsys):
    x = np.full((4, 3, 32, 32), np.nan, dtype=np.float32)
    y = np.zeros(4, dtype=np.int32)
    args = SimpleNamespace(accum_iter=1, lr=1e-3, min_lr=1e-6, warmup_epochs=1, epochs=2)
    with ms_mode(ms.GRAPH_MODE):
        m, o = _model_and_opt()
        s = Stepper(m, o, accum_iter=1)
        with pytest.raises(SystemExit) as e:
            train_one_epoch(m, None, _Loader([(x, y)]), o, 'CPU', 0, None, None, None, args=args, stepper=s)
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "Loss is nan" in out and "--clip_grad" in out


def test_loss_scaler_rules_like_torch_gradscaler():
    from util_mindspore.optim import LossScaler
    sc = LossScaler(init_scale=8.0, growth_interval=2)
    t, f = ms.Tensor(True), ms.Tensor(False)
    sc(t)
    assert sc.state_dict() == {"scale": 8.0, "growth_tracker": 1.0}
    sc(t)  # 2 consecutive finite steps: grow
    assert sc.state_dict() == {"scale": 16.0, "growth_tracker": 0.0}
    sc(t)
    sc(f)  # overflow: back off, reset the tracker
    assert sc.state_dict() == {"scale": 8.0, "growth_tracker": 0.0}
    sc.load_state_dict({"scale": 4.0, "growth_tracker": 1.0})
    assert sc.state_dict() == {"scale": 4.0, "growth_tracker": 1.0}


@pytest.mark.parametrize("accum_iter", [1, 2])
def test_fp16_loss_scaling_step_and_overflow_skip(accum_iter):
    from util_mindspore.optim import LossScaler
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int32)
    with ms_mode(ms.GRAPH_MODE):
        ref_m, ref_o = _model_and_opt()
        ref = Stepper(ref_m, ref_o, accum_iter=1)
        ref_m.set_train(True)
        ref_loss = float(ref(x, y, 1e-3).asnumpy())
        m, o = _model_and_opt()
        ms.amp.auto_mixed_precision(m, "O2", dtype=ms.float16)
        scaler = LossScaler()
        s = Stepper(m, o, accum_iter=accum_iter, loss_scaler=scaler)
        m.set_train(True)
        before = _params(m)

        def step():
            loss = None
            for k in range(accum_iter):
                loss = s(x, y, 1e-3, update=(k == accum_iter - 1))
            return float(loss.asnumpy())

        loss = step()  # finite: an ordinary step, loss reported unscaled
        assert abs(loss - ref_loss) < 2e-2 * abs(ref_loss)
        after = _params(m)
        assert float(o.step_count.asnumpy()) == 1.0
        delta = {k: after[k] - before[k] for k in after}
        ref_delta = {k: v - before[k] for k, v in _params(ref_m).items()}
        k = 'blocks.0.attn.qkv.weight'
        cos = np.sum(delta[k] * ref_delta[k]) / (np.linalg.norm(delta[k]) * np.linalg.norm(ref_delta[k]))
        assert cos > 0.9  # the fp16 update points where the fp32 update points

        scaler.load_state_dict({"scale": 3.0e38, "growth_tracker": 0.0})  # forces inf gradients
        step()
        assert all(np.array_equal(after[k2], v) for k2, v in _params(m).items())  # step skipped
        assert float(o.step_count.asnumpy()) == 1.0
        assert scaler.state_dict()["scale"] == pytest.approx(1.5e38, rel=1e-6)


@pytest.mark.parametrize("mode,jit", [(ms.PYNATIVE_MODE, False), (ms.PYNATIVE_MODE, True)],
                         ids=["pynative", "jit"])
def test_pynative_and_jit_steps_equal_the_graph_step(mode, jit):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int32)
    with ms_mode(ms.GRAPH_MODE):
        m1, o1 = _model_and_opt()
        m1.set_train(True)
        Stepper(m1, o1)(x, y, 1e-3)
    with ms_mode(mode):
        m2, o2 = _model_and_opt()
        m2.set_train(True)
        Stepper(m2, o2, jit=jit)(x, y, 1e-3)
    p1, p2 = _params(m1), _params(m2)
    assert max(float(np.max(np.abs(p1[k] - p2[k]))) for k in p1) <= 1e-5


def test_linear_probe_trains_only_the_head():
    """--adaptation lp: everything but head.* frozen and left out of the optimizer (main's rule)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int32)
    with ms_mode(ms.GRAPH_MODE):
        np.random.seed(0)
        m = tiny_vit(global_pool=True)
        for p in m.get_parameters():
            p.requires_grad = p.name.startswith("head.")
        o = AdamW(param_groups_lrd(m, 0.05, m.no_weight_decay(), 0.65), lr=1e-3)
        assert sorted(p.name for p in o.parameters) == ["head.bias", "head.weight"]
        m.set_train(True)
        before = _params(m)
        s = Stepper(m, o)
        for _ in range(2):
            s(x, y, 1e-2)
        after = _params(m)
    changed = sorted(k for k in after if not np.array_equal(after[k], before[k]))
    assert changed == ["head.bias", "head.weight"]


@pytest.mark.parametrize("mode", [pytest.param(ms.GRAPH_MODE, id="graph"), pytest.param(ms.PYNATIVE_MODE, id="pynative")])
def test_predict_packs_fp32_weights_in_place_between_training_steps(mode, monkeypatch, capsys):
    """engine predict() (evaluate, --eval) over 4+ batches runs the fp32 Linear layers on weights
    packed in place, then restores them: the probabilities equal those of the unpacked path, and
    training steps after it are bit-identical to steps after an evaluation without packing."""
    from engine_finetune_mindspore import predict
    from util_mindspore import cpu_kernels
    if not cpu_kernels.linear_available() or cpu_kernels.bf16_matmul():
        pytest.skip(cpu_kernels.status())
    rng = np.random.default_rng(3)
    loader = [(rng.standard_normal((b, 3, 32, 32)).astype(np.float32), rng.integers(0, 3, b)) for b in (4, 4, 4, 3)]
    xt, yt = rng.standard_normal((4, 3, 32, 32)).astype(np.float32), rng.integers(0, 3, 4).astype(np.int32)
    runs = {}
    with ms_mode(mode):
        m, _ = _model_and_opt(seed=5)
        with cpu_kernels.frozen_weights(m) as frozen:
            packed = frozen.packed  # how many of its 9 Linear weights pack in place on this CPU
        if packed == 0:
            pytest.skip("no Linear shape of the tiny model packs in place on this CPU")
        for pack in ("1", "0"):
            monkeypatch.setenv(cpu_kernels.ENV_PACK, pack)
            m, o = _model_and_opt(seed=5)
            s = Stepper(m, o)
            m.set_train(True)
            s(xt, yt, 1e-3)
            calls = cpu_kernels.in_place_stats()['calls']
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a restore by verify() would warn
                labels, probs, _ = predict(m, loader, 4, print_freq=100)
            used = cpu_kernels.in_place_stats()['calls'] - calls
            m.set_train(True)
            s(xt, yt, 1e-3)
            runs[pack] = (probs, used, _params(m))
    capsys.readouterr()
    # every packed weight was read by the packed path in each of the 4 batches; none without packing
    assert runs["1"][1] == 4 * packed and runs["0"][1] == 0
    assert probs.shape == (15, 3) and np.max(np.abs(runs["1"][0] - runs["0"][0])) <= 1e-6
    for k, v in runs["0"][2].items():
        assert np.array_equal(runs["1"][2][k], v), k


def test_changing_the_learning_rate_does_not_recompile():
    """The LR is a tensor input of the step graph: one compiled graph for every LR value.
    Negative control: a new input shape does compile a second graph, so the count can move."""
    rng = np.random.default_rng(7)
    x = ms.Tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
    y = ms.Tensor(rng.integers(0, 3, 4).astype(np.int32))
    with ms_mode(ms.GRAPH_MODE):
        m, o = _model_and_opt()
        m.set_train(True)
        s = Stepper(m, o)
        for lr in (1e-3, 2e-3, 5e-4, 0.0):
            s(x.asnumpy(), y.asnumpy(), lr)
        assert len(s.train_step._compile_cache) == 1
        s(x.asnumpy()[:2], y.asnumpy()[:2], 1e-3)
        assert len(s.train_step._compile_cache) == 2


_AMP_CHILD = """
import sys
import numpy as np
import mindspore as ms
sys.path.insert(0, {root!r})
ms.set_device("CPU")
ms.set_context(mode=ms.GRAPH_MODE)
from tests.helpers import tiny_vit
from engine_finetune_mindspore import Stepper
from util_mindspore.lr_decay import param_groups_lrd
from util_mindspore.optim import AdamW, LossScaler
rng = np.random.default_rng(5)
x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
y = rng.integers(0, 3, 4).astype(np.int32)
np.random.seed(0)
m = tiny_vit(global_pool=True, drop_path_rate=0.2)
o = AdamW(param_groups_lrd(m, 0.05, m.no_weight_decay(), 0.65), lr=1e-3)
ms.amp.auto_mixed_precision(m, {level!r}, dtype=ms.float16)
s = Stepper(m, o, loss_scaler=LossScaler())
m.set_train(True)
before = m.blocks[0].mlp.fc1.weight.asnumpy().copy()
loss = float(s(x, y, 1e-3).asnumpy())
assert np.isfinite(loss) and 0.5 < loss < 3.0, loss
assert float(o.step_count.asnumpy()) == 1.0
assert not np.array_equal(m.blocks[0].mlp.fc1.weight.asnumpy(), before)
print("ok", loss)
"""


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_amp_levels_train_with_drop_path(level, tmp_path):
    """--amp_level O1/O2 with stochastic depth, as main runs it (a process without torch: torch
    patches inspect.getfile, which MindSpore's O1 rewrite relies on). fp16 reaches DropPath (O2)
    and the fused fp32 CPU kernels must step aside for fp16 tensors (O1 casts around MatMul)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "amp_child.py"
    script.write_text(_AMP_CHILD.format(root=root, level=level))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


_AMP_PREDICT_CHILD = """
import os, sys, warnings
import numpy as np
import mindspore as ms
sys.path.insert(0, {root!r})
ms.set_device("CPU")
ms.set_context(mode=ms.GRAPH_MODE)
from tests.helpers import tiny_vit
from engine_finetune_mindspore import predict
from util_mindspore import cpu_kernels as K
rng = np.random.default_rng(4)
loader = [(rng.standard_normal((b, 3, 32, 32)).astype(np.float32), rng.integers(0, 3, b)) for b in (4, 4, 4, 4)]
np.random.seed(0)
m = tiny_vit(global_pool=True)
m.set_train(False)
ms.amp.auto_mixed_precision(m, {level!r}, dtype=ms.float16)
os.environ[K.ENV_PACK] = "0"
ref = predict(m, loader, 4, print_freq=100)[1]
del os.environ[K.ENV_PACK]
c0 = K.in_place_stats()["calls"]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    packed_run = predict(m, loader, 4, print_freq=100)[1]
assert not [w for w in caught if "packed in place" in str(w.message)], caught  # no restore was needed
used = K.in_place_stats()["calls"] - c0
assert np.max(np.abs(packed_run - ref)) <= 1e-6, np.max(np.abs(packed_run - ref))
if {level!r} == "O2":
    # fp16 Dense inputs take MatMul: nothing is packed in the first place
    assert K._mixed_precision(m) and K._in_place_weights(m) == [] and used == 0
    # without that check, verify() after the first batch must catch the plain reads and recompute
    K._mixed_precision = lambda model: False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guarded = predict(m, loader, 4, print_freq=100)[1]
    assert any("not read by the packed forward" in str(w.message) for w in caught), caught
    assert np.max(np.abs(guarded - ref)) <= 1e-6, np.max(np.abs(guarded - ref))
    assert K.packed_in_place() == 0
else:
    assert used > 0  # O1 keeps fp32 Dense inputs: the packed path runs
print("ok", used)
"""


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_amp_level_evaluation_is_the_same_with_weights_packed_in_place(level, tmp_path):
    """predict() under --amp_level: O2/O3 give the Linear layers float16 inputs, so they take
    MatMul, whose Cast would read a weight packed in place as a plain one. Such models are not
    packed, and if one were, FrozenWeights.verify() restores the weights after the first batch and
    predict recomputes it: the probabilities equal those without packing. (A child process
    without torch, as test_amp_levels_train_with_drop_path.)"""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "amp_predict_child.py"
    script.write_text(_AMP_PREDICT_CHILD.format(root=root, level=level))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.torch
@pytest.mark.parametrize("accum_iter", [1, 2])
@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_train_steps_equal_the_original_train_steps(mode, accum_iter):
    """Whole compiled steps (forward, loss, backward, AdamW over layer-decay groups) against the
    original's (engine_finetune.py: CrossEntropyLoss, backward, torch.optim.AdamW) from the same
    weights. On CPU the update is the library's in-place AdamW kernel, which MindSpore cannot see
    writing the parameters; the whole steps must equal the composed update's bit for bit (an update
    run before a backward operator had read its parameter would change the gradients below it).
    The ordering mechanism itself is tested at the operator level in test_cpu_kernels.py."""
    import torch
    from tests.original_reference import retfound_vit, lr_decay_param_groups, randomize_, state_dict_numpy
    tm = randomize_(retfound_vit(global_pool=True, num_classes=3, img_size=32, patch_size=8, embed_dim=32,
                                 depth=2, num_heads=4), seed=11)
    topt = torch.optim.AdamW(lr_decay_param_groups(tm, 0.05, tm.no_weight_decay(), 0.65), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(4)
    batches = [(rng.standard_normal((8, 3, 32, 32)).astype(np.float32), rng.integers(0, 3, 8).astype(np.int64))
               for _ in range(3)]
    lrs = (1e-3, 3e-3, 2e-3)
    tm.train()
    for (x, y), lr in zip(batches, lrs):
        for g in topt.param_groups:
            g['lr'] = lr * g['lr_scale']
        loss = criterion(tm(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        topt.step()
        topt.zero_grad()
    ref = state_dict_numpy(tm)
    init = state_dict_numpy(randomize_(retfound_vit(global_pool=True, num_classes=3, img_size=32, patch_size=8,
                                                    embed_dim=32, depth=2, num_heads=4), seed=11))
    got = {}
    with ms_mode(mode):
        for fused in (True, False):  # on CPU: the in-place kernel, and the composed update
            m = load_numpy_state(tiny_vit(global_pool=True), init)
            opt = AdamW(param_groups_lrd(m, 0.05, m.no_weight_decay(), 0.65), lr=1e-3, fused=fused)
            m.set_train(True)
            stepper = Stepper(m, opt, accum_iter=accum_iter)
            for (x, y), lr in zip(batches, lrs):
                if accum_iter == 1:
                    stepper(x, y.astype(np.int32), lr)
                else:  # two micro-batches of loss / 2: the same gradient as the whole batch
                    stepper(x[:4], y[:4].astype(np.int32), lr, update=False)
                    stepper(x[4:], y[4:].astype(np.int32), lr, update=True)
            got[fused] = _params(m)
    for k in got[True]:  # the same operations in the same order: bit for bit
        np.testing.assert_array_equal(got[True][k], got[False][k], err_msg=k)
    moved = max(float(np.max(np.abs(got[True][k] - init[k]))) for k in init)
    worst = max(float(np.max(np.abs(got[True][k] - ref[k]))) for k in ref)
    assert moved > 5e-3  # three real updates (AdamW moves each weight by up to ~lr per step)
    # fp32 rounding of forward/backward, amplified where AdamW divides tiny gradients by
    # sqrt(v): ~2e-5 here, under 1% of the parameters' movement
    assert worst <= 0.01 * moved, (worst, moved)
