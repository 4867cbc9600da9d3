# --------------------------------------------------------
# Tests for util_mindspore/weight_converter.py: reading .pth/.ckpt/.safetensors without torch,
# refusing malicious pickles, strict key accounting (tiny models, plus the real ViT-L key
# names built cheaply), the converted-weights cache, and every error a user can meet.
# Checkpoints are written with torch.save, as the original writes them. Written for this port.
# --------------------------------------------------------
import argparse
import collections
import os
import pickle
import types
import zipfile

import numpy as np
import pytest

import util_mindspore.weight_converter as wc
from util_mindspore.weight_converter import (EXPECTED_MISSING, PUBLISHED_WEIGHTS, WeightLoadError,
                                             load_model_weights, load_pretrained, read_checkpoint)
from util_mindspore.pos_embed import bicubic_resize_torch

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def _tiny(**kw):
    from models_vit_mindspore import VisionTransformer
    cfg = dict(TINY, global_pool=True)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def _shapes(**kw):
    return {k: tuple(p.shape) for k, p in _tiny(**kw).parameters_dict().items()}


def _torch_sd(shapes, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    return collections.OrderedDict((k, torch.randn(s, generator=g)) for k, s in shapes.items())


def _mae_pretrain_sd(seed=0, **kw):
    """Like RETFound MAE pre-training's 'model': encoder with the final norm, no head, + decoder."""
    import torch
    sd = _torch_sd({k: s for k, s in _shapes(global_pool=False, **kw).items() if not k.startswith('head.')}, seed)
    sd['mask_token'] = torch.zeros(1, 1, 16)
    sd['decoder_embed.weight'] = torch.zeros(16, 32)
    sd['decoder_blocks.0.norm1.weight'] = torch.zeros(16)
    sd['decoder_pred.weight'] = torch.zeros(192, 16)
    return sd


def _np(t):
    return t.detach().float().numpy()


def _ms_params(model):
    return {k: p.asnumpy() for k, p in model.parameters_dict().items()}


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize('zipped', [True, False])
def test_read_pth_dtypes_views_namespace(tmp_path, zipped):
    import torch
    x = torch.randn(10)
    sd = collections.OrderedDict(
        f32=torch.randn(3, 4), transposed=torch.randn(4, 3).t(), f16=torch.randn(5).half(),
        bf16=torch.randn(6).bfloat16(), i64=torch.arange(5), empty=torch.zeros(0, 3),
        param=torch.nn.Parameter(torch.randn(2)), view=x[2:5], strided=x[::2])
    args = argparse.Namespace(lr=1e-3, model='RETFound_mae', best=np.float64(0.5))
    path = tmp_path / 'c.pth'
    torch.save({'model': sd, 'epoch': 3, 'args': args}, path, _use_new_zipfile_serialization=zipped)
    ck = read_checkpoint(path)
    assert ck['epoch'] == 3 and isinstance(ck['args'], types.SimpleNamespace)
    assert ck['args'].model == 'RETFound_mae' and ck['args'].best == 0.5
    for k, v in sd.items():
        ref = _np(v) if v.is_floating_point() else v.numpy()
        np.testing.assert_array_equal(ck['model'][k], ref)
    assert ck['model']['bf16'].dtype == np.float32 and ck['model']['f16'].dtype == np.float16


@pytest.mark.torch
def test_runtime_needs_no_torch(tmp_path):
    """Reading a .pth and loading it must work in an interpreter where torch cannot be imported."""
    import subprocess
    import sys
    import torch
    torch.save({'model': _mae_pretrain_sd(), 'args': argparse.Namespace(lr=1.0)}, tmp_path / 'w.pth')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.modules['torch'] = None; sys.path.insert(0, {root!r})\n"
            "from tests.test_weight_converter import _tiny\n"
            "from util_mindspore.weight_converter import load_pretrained\n"
            f"info = load_pretrained(_tiny(), {str(tmp_path / 'w.pth')!r}, 'RETFound_mae', cache_dir=None)\n"
            "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            "print('LOADED', info['loaded'])\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0 and 'LOADED 28' in out.stdout, out.stderr[-2000:]


@pytest.mark.torch
def test_read_safetensors_and_ckpt(tmp_path):
    import torch
    import mindspore as ms
    from safetensors.torch import save_file
    sd = {'a': torch.randn(2, 3), 'b': torch.randn(4).bfloat16()}
    save_file(sd, str(tmp_path / 'w.safetensors'))
    d = read_checkpoint(tmp_path / 'w.safetensors')
    np.testing.assert_array_equal(d['a'], _np(sd['a']))
    np.testing.assert_array_equal(d['b'], _np(sd['b']))
    ms.save_checkpoint([{'name': 'a', 'data': ms.Tensor(_np(sd['a']))}], str(tmp_path / 'w.ckpt'))
    np.testing.assert_array_equal(read_checkpoint(tmp_path / 'w.ckpt')['a'], _np(sd['a']))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('layout', ['zip', 'raw'])
def test_malicious_pickle_is_refused(tmp_path, layout):
    marker = tmp_path / 'PWNED'
    payload = pickle.dumps({'model': {'x': _Evil(marker)}}, protocol=2)
    path = tmp_path / 'evil.pth'
    if layout == 'zip':
        with zipfile.ZipFile(path, 'w') as z:
            z.writestr('archive/data.pkl', payload)
            z.writestr('archive/version', '3\n')
    else:
        path.write_bytes(payload)
    with pytest.raises(WeightLoadError, match=r"tries to import '(posix|os)\.system'.*refused|refused.*tries to import"):
        read_checkpoint(path)
    with pytest.raises(WeightLoadError, match='refused'):
        load_pretrained(_tiny(), str(path), 'RETFound_mae', cache_dir=str(tmp_path / 'cache'))
    assert not marker.exists()


@pytest.mark.torch
def test_corrupt_and_foreign_files(tmp_path):
    import torch
    good = tmp_path / 'good.pth'
    torch.save({'model': _torch_sd(_shapes())}, good)
    data = good.read_bytes()
    for name, content in [('trunc.pth', data[:len(data) // 2]), ('trunc_tail.pth', data[:-30])]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightLoadError, match='truncated or corrupt'):
            read_checkpoint(tmp_path / name)
    torch.save({'model': _torch_sd(_shapes())}, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
    legacy = (tmp_path / 'legacy.pth').read_bytes()
    (tmp_path / 'legacy_trunc.pth').write_bytes(legacy[:len(legacy) - 100])
    with pytest.raises(WeightLoadError, match='truncated or corrupt'):
        read_checkpoint(tmp_path / 'legacy_trunc.pth')
    (tmp_path / 'notes.pth').write_text('hello, I am a text file\n')
    with pytest.raises(WeightLoadError, match='not a checkpoint'):
        read_checkpoint(tmp_path / 'notes.pth')
    with zipfile.ZipFile(tmp_path / 'other.zip.pth', 'w') as z:
        z.writestr('readme.txt', 'x')
    with pytest.raises(WeightLoadError, match='without data.pkl'):
        read_checkpoint(tmp_path / 'other.zip.pth')
    (tmp_path / 'bad.ckpt').write_bytes(b'\x00' * 100)
    with pytest.raises(WeightLoadError, match='MindSpore checkpoint'):
        read_checkpoint(tmp_path / 'bad.ckpt')
    (tmp_path / 'bad.safetensors').write_bytes(b'\x05')
    with pytest.raises(WeightLoadError, match='safetensors'):
        read_checkpoint(tmp_path / 'bad.safetensors')
    with pytest.raises(WeightLoadError, match='checkpoint not found: .*missing.pth'):
        read_checkpoint(tmp_path / 'missing.pth')


# ---------------------------------------------------------------------------
# load_pretrained (--finetune)
# ---------------------------------------------------------------------------
@pytest.mark.torch
def test_mae_pretrained_strict_load(tmp_path, capsys):
    import torch
    sd = _mae_pretrain_sd()
    src = tmp_path / 'RETFound_mae_tiny.pth'
    torch.save({'model': sd}, src)
    model = _tiny()
    before = _ms_params(model)
    info = load_pretrained(model, str(src), 'RETFound_mae', cache_dir=str(tmp_path / 'cache'))
    after = _ms_params(model)
    for k in after:
        if k in sd:
            np.testing.assert_array_equal(after[k], _np(sd[k]))
    np.testing.assert_array_equal(after['fc_norm.weight'], before['fc_norm.weight'])
    assert np.abs(after['head.weight']).max() < 2e-4 and np.abs(after['head.weight']).std() > 0
    assert info['entry'] == 'model' and not info['cache_hit'] and os.path.isfile(info['cache'])
    assert info['missing'] == sorted(EXPECTED_MISSING)
    assert info['unexpected'] == ['decoder_blocks.0.norm1.weight', 'decoder_embed.weight', 'decoder_pred.weight',
                                  'mask_token', 'norm.bias', 'norm.weight']
    assert info['loaded'] == len(after) - 4 and info['interpolated'] is None
    out = capsys.readouterr().out
    assert 'Loaded pre-trained checkpoint from' in out and 'missing (kept fresh init)' in out


@pytest.mark.torch
def test_cache_hit_other_input_size_and_stale_source(tmp_path, monkeypatch, capsys):
    import torch
    sd = _mae_pretrain_sd(seed=1)
    src = tmp_path / 'w.pth'
    torch.save({'model': sd}, src)
    cache = str(tmp_path / 'cache')
    first = load_pretrained(_tiny(), str(src), 'RETFound_mae', cache_dir=cache)
    # second run, other --input_size: served from the cache without reading or hashing the source
    calls = collections.Counter()
    real_read, real_sha = wc.read_checkpoint, wc.hashlib.sha256
    monkeypatch.setattr(wc, 'read_checkpoint', lambda *a: calls.update(['read']) or real_read(*a))
    monkeypatch.setattr(wc.hashlib, 'sha256', lambda *a: calls.update(['sha']) or real_sha(*a))
    model = _tiny(img_size=40)
    info = load_pretrained(model, str(src), 'RETFound_mae', cache_dir=cache)
    assert info['cache_hit'] and info['cache'] == first['cache'] and not calls
    assert info['interpolated'] == '4x4 -> 5x5' and 'Position interpolate from 4x4 to 5x5' in capsys.readouterr().out
    pe = _np(sd['pos_embed'])
    grid = bicubic_resize_torch(pe[:, 1:].reshape(1, 4, 4, 32).transpose(0, 3, 1, 2), 5)
    want = np.concatenate([pe[:, :1], grid.transpose(0, 2, 3, 1).reshape(1, 25, 32)], axis=1)
    np.testing.assert_allclose(model.pos_embed.asnumpy(), want, atol=1e-6)
    # a changed source is never served the stale cache
    sd2 = _mae_pretrain_sd(seed=2)
    torch.save({'model': sd2}, src)
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    model = _tiny()
    info = load_pretrained(model, str(src), 'RETFound_mae', cache_dir=cache)
    assert not info['cache_hit'] and info['cache'] != first['cache'] and calls['read'] == 1
    np.testing.assert_array_equal(model.parameters_dict()['blocks.0.attn.qkv.weight'].asnumpy(),
                                  _np(sd2['blocks.0.attn.qkv.weight']))
    assert not [f for f in os.listdir(cache) if f.startswith('.')]  # no temporary files left


@pytest.mark.torch
def test_dinov2_teacher_hygiene_and_interpolation(tmp_path):
    import torch
    shapes = _shapes(global_pool=False, init_values=1e-5)
    sd = _torch_sd({k: s for k, s in shapes.items() if not k.startswith('head.')})
    sd['pos_embed'] = torch.randn(1, 1 + 6 * 6, 32)  # trained at another grid (like 37x37 -> 16x16)
    teacher = collections.OrderedDict()
    for k, v in sd.items():  # DINOv2 naming: backbone. prefix, chunked blocks (blocks.C.N.)
        k = k.replace('blocks.1.', 'blocks.1.1.').replace('blocks.0.', 'blocks.0.0.')
        teacher['backbone.' + k] = v
    teacher['backbone.mask_token'] = torch.zeros(1, 32)
    teacher['dino_head.mlp.0.weight'] = torch.zeros(8, 32)
    teacher['ibot_head.last_layer.weight_g'] = torch.zeros(1, 8)
    torch.save({'teacher': teacher, 'student': {'x': torch.zeros(1)}}, tmp_path / 'd.pth')
    model = _tiny(global_pool=False, init_values=1e-5)
    info = load_pretrained(model, str(tmp_path / 'd.pth'), 'RETFound_dinov2', cache_dir=None)
    assert info['entry'] == 'teacher' and info['interpolated'] == '6x6 -> 4x4'
    assert info['missing'] == ['head.bias', 'head.weight']
    assert info['unexpected'] == ['dino_head.mlp.0.weight', 'ibot_head.last_layer.weight_g', 'mask_token']
    got = model.parameters_dict()
    np.testing.assert_array_equal(got['blocks.1.ls2.gamma'].asnumpy(), _np(sd['blocks.1.ls2.gamma']))
    # a backbone trained with register tokens is refused, not silently truncated
    teacher['backbone.register_tokens'] = torch.zeros(1, 4, 32)
    torch.save({'teacher': teacher}, tmp_path / 'r.pth')
    with pytest.raises(WeightLoadError, match='register_tokens'):
        load_pretrained(_tiny(global_pool=False, init_values=1e-5), str(tmp_path / 'r.pth'), 'RETFound_dinov2',
                        cache_dir=None)


@pytest.mark.torch
def test_dinov2_whole_dict_swiglu_rename(tmp_path):
    import torch
    kw = dict(global_pool=False, init_values=1e-5, mlp_layer='swiglu_packed', mlp_ratio=2.66667 * 2)
    shapes = {k: s for k, s in _shapes(**kw).items() if not k.startswith('head.')}
    sd = _torch_sd(shapes)
    raw = {k.replace('mlp.fc1.', 'mlp.w12.').replace('mlp.fc2.', 'mlp.w3.'): v for k, v in sd.items()}
    torch.save(raw, tmp_path / 'g.pth')
    model = _tiny(**kw)
    info = load_pretrained(model, str(tmp_path / 'g.pth'), 'Dinov2', cache_dir=None)
    assert info['entry'] == '(top level)' and info['unexpected'] == []
    np.testing.assert_array_equal(model.parameters_dict()['blocks.0.mlp.fc1.weight'].asnumpy(),
                                  _np(sd['blocks.0.mlp.fc1.weight']))


@pytest.mark.torch
def test_finetune_errors(tmp_path):
    import torch
    model = _tiny()
    with pytest.raises(WeightLoadError) as e:
        load_pretrained(model, str(tmp_path / 'nowhere.pth'), 'RETFound_mae', cache_dir=None)
    assert all(n in str(e.value) for n in PUBLISHED_WEIGHTS) and 'neither' in str(e.value)
    # (a bare name that is no file is fetched from YukunZhou/<name>, as the original: test_hf_download.py)
    torch.save({'state_dict': _mae_pretrain_sd(), 'epoch': 1}, tmp_path / 'x.pth')
    with pytest.raises(WeightLoadError, match=r"no 'model' entry .*keys: state_dict, epoch"):
        load_pretrained(model, str(tmp_path / 'x.pth'), 'RETFound_mae', cache_dir=None)
    with pytest.raises(WeightLoadError, match=r"no 'teacher' entry"):
        load_pretrained(model, str(tmp_path / 'x.pth'), 'RETFound_dinov2', cache_dir=None)
    torch.save({'teacher': _mae_pretrain_sd()}, tmp_path / 't.pth')
    with pytest.raises(WeightLoadError, match="under 'teacher' .*--model RETFound_dinov2"):
        load_pretrained(model, str(tmp_path / 't.pth'), 'Dinov2', cache_dir=None)
    torch.save({'model': _mae_pretrain_sd(), 'epoch': 1}, tmp_path / 'm.pth')
    with pytest.raises(WeightLoadError, match="under 'model' .*--model RETFound_mae") as e:
        load_pretrained(model, str(tmp_path / 'm.pth'), 'Dinov2', cache_dir=None)
    assert 'RETFound_dinov2' not in str(e.value)
    # another architecture: deeper and wider than the model
    torch.save({'model': _mae_pretrain_sd(embed_dim=48, depth=3, num_heads=3)}, tmp_path / 'big.pth')
    with pytest.raises(WeightLoadError) as e:
        load_pretrained(model, str(tmp_path / 'big.pth'), 'RETFound_mae', cache_dir=None)
    msg = str(e.value)
    assert 'does not match the model' in msg and 'blocks.0.attn.qkv.weight: checkpoint (144, 48) vs model (96, 32)' in msg
    assert 'checkpoint keys the model does not have: blocks.2.' in msg


# ---------------------------------------------------------------------------
# Key accounting with the real ViT-Large names (built cheaply: one block, replicated)
# ---------------------------------------------------------------------------
class _FakeModel:
    """Just what the loader reads from a model: parameter shapes, patch count, pos_embed shape."""

    def __init__(self, shapes, num_patches):
        self._shapes = shapes
        self.patch_embed = types.SimpleNamespace(num_patches=num_patches)
        self.pos_embed = types.SimpleNamespace(shape=shapes['pos_embed'])

    def parameters_dict(self):
        return {k: types.SimpleNamespace(shape=s) for k, s in self._shapes.items()}


def _replicate_blocks(shapes, depth, prefix='blocks.'):
    out = collections.OrderedDict()
    for k, s in shapes.items():
        if k.startswith(prefix + '0.'):
            for i in range(depth):
                out[prefix + str(i) + k[len(prefix) + 1:]] = s
        else:
            out[k] = s
    return out


def _zeros(shapes):  # shape-correct arrays that allocate nothing
    return collections.OrderedDict((k, np.broadcast_to(np.float32(0), s)) for k, s in shapes.items())


def _ms_vit_l(**kw):
    from models_vit_mindspore import VisionTransformer
    m = VisionTransformer(embed_dim=1024, depth=1, num_heads=16, num_classes=5, **kw)
    return _replicate_blocks({k: tuple(p.shape) for k, p in m.parameters_dict().items()}, 24), m.patch_embed.num_patches


def _timm_shapes(model, depth, prefix=''):
    return _replicate_blocks({prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}, depth,
                             prefix + 'blocks.')


def _plan(model, checkpoint, model_name):
    entry, sd = wc._select_entry(checkpoint, model_name, 'ckpt')
    sd, removed, interp = wc._prepare_for_model(model, wc._key_hygiene(sd))
    return wc._account(wc._param_shapes(model), sd, 'ckpt', lambda k: k in EXPECTED_MISSING,
                       wc._allowed_unexpected)


@pytest.mark.torch
def test_vit_large_key_accounting():
    import timm
    from timm.models.vision_transformer import Block, VisionTransformer
    # RETFound_mae (ViT-L/16, global pool) <- MAE pre-training checkpoint (encoder + decoder)
    shapes, n = _ms_vit_l(img_size=224, patch_size=16, global_pool=True)
    model = _FakeModel(shapes, n)
    enc = _timm_shapes(VisionTransformer(patch_size=16, embed_dim=1024, depth=1, num_heads=16, num_classes=0), 24)
    dec = {'mask_token': (1, 1, 512), 'decoder_embed.weight': (512, 1024), 'decoder_embed.bias': (512,),
           'decoder_pos_embed': (1, 197, 512), 'decoder_norm.weight': (512,), 'decoder_norm.bias': (512,),
           'decoder_pred.weight': (768, 512), 'decoder_pred.bias': (768,)}
    dec.update(_replicate_blocks({'decoder_blocks.0.' + k: tuple(v.shape) for k, v in
                                  Block(512, 16, qkv_bias=True).state_dict().items()}, 8, 'decoder_blocks.'))
    missing, unexpected = _plan(model, {'model': _zeros({**enc, **dec})}, 'RETFound_mae')
    assert missing == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert set(unexpected) == {'norm.weight', 'norm.bias'} | set(dec) and len(unexpected) == 2 + 8 + 8 * 12
    # ViT-B weights into ViT-L fail and say so
    base = _timm_shapes(VisionTransformer(patch_size=16, embed_dim=768, depth=1, num_heads=12, num_classes=0), 12)
    with pytest.raises(WeightLoadError) as e:
        _plan(model, {'model': _zeros(base)}, 'RETFound_mae')
    msg = str(e.value)
    assert '148 shape mismatches: cls_token: checkpoint (1, 1, 768) vs model (1, 1, 1024)' in msg
    assert 'patch_embed.proj.weight: checkpoint (768, 3, 16, 16) vs model (1024, 3, 16, 16)' in msg
    assert '144 model keys missing from the checkpoint: blocks.12.' in msg
    # RETFound_dinov2 (ViT-L/14 at 224, LayerScale) <- DINOv2 teacher trained at 518 (37x37 grid)
    shapes, n = _ms_vit_l(img_size=224, patch_size=14, global_pool=False, init_values=1e-5)
    dino = timm.create_model('vit_large_patch14_dinov2', pretrained=False, depth=1, num_classes=0, img_size=518)
    teacher = _timm_shapes(dino, 24, 'backbone.')
    teacher.update({'backbone.mask_token': (1, 1024), 'dino_head.mlp.0.weight': (2048, 1024),
                    'dino_head.last_layer.weight_g': (1, 256), 'ibot_head.mlp.0.weight': (2048, 1024)})
    teacher = _zeros(teacher)
    teacher['backbone.pos_embed'] = np.zeros((1, 1 + 37 * 37, 1024), np.float32)
    missing, unexpected = _plan(_FakeModel(shapes, n), {'teacher': teacher}, 'RETFound_dinov2')
    assert missing == ['head.bias', 'head.weight']
    assert unexpected == ['dino_head.last_layer.weight_g', 'dino_head.mlp.0.weight', 'ibot_head.mlp.0.weight',
                          'mask_token']


# ---------------------------------------------------------------------------
# load_model_weights (--resume / --eval)
# ---------------------------------------------------------------------------
@pytest.mark.torch
def test_load_model_weights_from_original_pth(tmp_path):
    import torch
    sd = _torch_sd(_shapes())
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    args = argparse.Namespace(model='RETFound_mae', nb_classes=3, input_size=32)
    torch.save({'model': sd, 'optimizer': opt.state_dict(), 'epoch': 7, 'scaler': {}, 'args': args},
               tmp_path / 'checkpoint-best.pth')
    model = _tiny()
    meta = load_model_weights(model, tmp_path / 'checkpoint-best.pth')
    assert meta['epoch'] == 7 and meta['args']['nb_classes'] == 3 and meta['has_optimizer']
    for k, p in model.parameters_dict().items():
        np.testing.assert_array_equal(p.asnumpy(), _np(sd[k]))  # head included, no re-init
    with pytest.raises(WeightLoadError, match=r'missing from the checkpoint: norm.bias, norm.weight\n.*fc_norm.bias'):
        load_model_weights(_tiny(global_pool=False, num_classes=3), tmp_path / 'checkpoint-best.pth')


def test_load_model_weights_from_ckpt(tmp_path):
    import mindspore as ms
    model = _tiny()
    path = str(tmp_path / 'checkpoint-best.ckpt')
    ms.save_checkpoint(model, path, append_dict={'epoch': 4, 'model_name': 'RETFound_mae'})
    fresh = _tiny()
    meta = load_model_weights(fresh, path)
    assert meta['epoch'] == 4 and meta['model_name'] == 'RETFound_mae'
    for k, p in fresh.parameters_dict().items():
        np.testing.assert_array_equal(p.asnumpy(), model.parameters_dict()[k].asnumpy())
    with pytest.raises(WeightLoadError, match=r'head.weight: checkpoint \(3, 32\) vs model \(5, 32\)'):
        load_model_weights(_tiny(num_classes=5), path)
    with pytest.raises(WeightLoadError, match='checkpoint not found'):
        load_model_weights(fresh, tmp_path / 'nope.ckpt')
    # our own .ckpt also works as --finetune: scalar/str metadata is not taken for weights
    info = load_pretrained(_tiny(), path, 'RETFound_mae', cache_dir=None)
    assert info['entry'] == '(top level)' and info['missing'] == [] and info['unexpected'] == []


# ---------------------------------------------------------------------------
# convert_weights_example.py: failures exit non-zero and never print success
# ---------------------------------------------------------------------------
def test_cli_fails_cleanly(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / 'notes.pth').write_text('not weights')
    for finetune in ('RETFound_mae_typo', str(tmp_path / 'missing.pth'), str(tmp_path / 'notes.pth')):
        out = subprocess.run([sys.executable, os.path.join(root, 'convert_weights_example.py'), '--finetune',
                              finetune, '--cache_dir', str(tmp_path / 'cache'), '--model', 'vit_base_patch16'],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 1, out.stderr
        assert 'ERROR:' in out.stderr and 'OK' not in out.stdout and 'Converted weights' not in out.stdout


def test_cli_converts_caches_and_runs_a_forward_pass(tmp_path):
    """The success path: a real (small) checkpoint, converted, cached, one forward pass, exit 0."""
    import subprocess
    import sys
    import mindspore as ms
    import models_vit_mindspore as models
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / 'vit_tiny_pretrained.ckpt'
    ms.save_checkpoint(models.vit_tiny_patch16(img_size=32, num_classes=0), str(src))
    cmd = [sys.executable, os.path.join(root, 'convert_weights_example.py'), '--finetune', str(src),
           '--model', 'vit_tiny_patch16', '--input_size', '48', '--nb_classes', '4', '--cache_dir', str(tmp_path / 'c')]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    cached = list((tmp_path / 'c').glob('*.ckpt'))
    assert len(cached) == 1 and str(cached[0]) in out.stdout
    assert 'Position interpolate from 2x2 to 3x3' in out.stdout and '(1, 4)' in out.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert again.returncode == 0 and 'hit' in again.stdout.lower()


def test_cli_picks_the_architecture_of_a_published_name():
    import convert_weights_example as cli
    assert cli.default_model('RETFound_dinov2_meh') == 'RETFound_dinov2'
    assert cli.default_model('RETFound_mae_natureCFP') == 'RETFound_mae'
    assert cli.default_model('/data/RETFound_dinov2_shanghai.pth') == 'RETFound_dinov2'
