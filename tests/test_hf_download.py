# --------------------------------------------------------
# Tests: --finetune NAME through the real huggingface_hub.hf_hub_download, offline.
# (a) a small HTTP stand-in for the Hub on 127.0.0.1 behind HF_ENDPOINT (HEAD + GET of
#     /{repo}/resolve/main/{file}, gated/missing answers as the Hub sends them);
# (b) a prepared Hugging Face cache with HF_HUB_OFFLINE=1.
# huggingface_hub reads HF_* at import time, so every case runs in a fresh subprocess.
# Written for this port; no code copied.
# --------------------------------------------------------
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = 'a' * 40
TOKEN = 'hf_test_token_123'


def _tiny_pth_bytes(tmp_path):
    """A real, tiny torch-format .pth (MAE-style {'model': ...}) written by torch.save."""
    torch = pytest.importorskip('torch')
    sd = {'cls_token': torch.zeros(1, 1, 32), 'pos_embed': torch.full((1, 17, 32), 0.5),
          'patch_embed.proj.weight': torch.ones(32, 3, 8, 8), 'patch_embed.proj.bias': torch.zeros(32)}
    path = tmp_path / 'src.pth'
    torch.save({'model': sd}, path)
    return path.read_bytes()


class _Hub(http.server.BaseHTTPRequestHandler):
    files = {}  # '/YukunZhou/NAME/resolve/main/NAME.pth' -> bytes
    gated = set()  # repo ids that need the token
    log = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _answer(self, body_wanted):
        self.log.append((self.command, self.path))
        parts = self.path.split('?')[0].strip('/').split('/')
        repo = '/'.join(parts[:2])
        if repo in self.gated and self.headers.get('Authorization') != f'Bearer {TOKEN}':
            return self._error(401, 'GatedRepo', 'Access to this repo is restricted.')
        if not any(p.startswith('/' + repo + '/') for p in self.files):
            return self._error(404, 'RepoNotFound', 'Repository not found')
        data = self.files.get(self.path.split('?')[0])
        if data is None:
            return self._error(404, 'EntryNotFound', 'Entry not found')
        self.send_response(200)
        self.send_header('X-Repo-Commit', COMMIT)
        self.send_header('ETag', '"%s"' % hashlib.sha256(data).hexdigest())
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Content-Type', 'application/octet-stream')
        self.end_headers()
        if body_wanted:
            self.wfile.write(data)

    def _error(self, code, error_code, message):
        body = json.dumps({'error': message}).encode()
        self.send_response(code)
        self.send_header('X-Error-Code', error_code)
        self.send_header('X-Error-Message', message)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def do_HEAD(self):
        self._answer(False)

    def do_GET(self):
        self._answer(True)


@pytest.fixture()
def hub(tmp_path):
    data = _tiny_pth_bytes(tmp_path)
    _Hub.files = {f'/YukunZhou/{n}/resolve/main/{n}.pth': data
                  for n in ('RETFound_mae_meh', 'RETFound_mae_natureCFP', 'RETFound_mae_later')}
    _Hub.files['/YukunZhou/RETFound_dinov2_meh/resolve/main/README.md'] = b'no weights here'
    _Hub.gated = {'YukunZhou/RETFound_mae_natureCFP'}
    _Hub.log = []
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}', data
    server.shutdown()
    server.server_close()


# Runs resolve_finetune for each name in a fresh interpreter and prints one JSON line per name.
_SCRIPT = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
from util_mindspore.weight_converter import resolve_finetune, WeightLoadError
for name in sys.argv[2:]:
    try:
        path, _ = resolve_finetune(name)
        print(json.dumps({'name': name, 'path': path, 'bytes': open(path, 'rb').read().hex()}))
    except WeightLoadError as e:
        print(json.dumps({'name': name, 'error': str(e)}))
'''


def _run(names, env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_XET='1',
               HF_HUB_DISABLE_PROGRESS_BARS='1', HF_HUB_ETAG_TIMEOUT='5', HF_HUB_DOWNLOAD_TIMEOUT='5')
    env.update(env_extra)
    out = subprocess.run([sys.executable, '-c', _SCRIPT, ROOT, *names], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {r['name']: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith('{'))}


@pytest.mark.torch
def test_download_gated_missing_and_token(hub, tmp_path):
    endpoint, data = hub
    res = _run(['RETFound_mae_meh', 'RETFound_mae_natureCFP', 'RETFound_mae_shanghai', 'RETFound_dinov2_meh'],
               {'HF_ENDPOINT': endpoint}, tmp_path)
    ok = res['RETFound_mae_meh']
    assert bytes.fromhex(ok['bytes']) == data
    assert f'models--YukunZhou--RETFound_mae_meh/snapshots/{COMMIT}/RETFound_mae_meh.pth' in ok['path']
    gated = res['RETFound_mae_natureCFP']['error']
    assert 'gated' in gated and 'hf auth login' in gated and 'HF_TOKEN' in gated and 'HF_ENDPOINT' in gated
    assert 'local .pth' in gated
    assert 'not found' in res['RETFound_mae_shanghai']['error'] and 'HF_TOKEN' in res['RETFound_mae_shanghai']['error']
    assert 'RETFound_dinov2_meh.pth was not found in repo' in res['RETFound_dinov2_meh']['error']
    # with the token the gated repo downloads (huggingface_hub sends HF_TOKEN as a Bearer token)
    res = _run(['RETFound_mae_natureCFP'], {'HF_ENDPOINT': endpoint, 'HF_TOKEN': TOKEN}, tmp_path)
    assert bytes.fromhex(res['RETFound_mae_natureCFP']['bytes']) == data
    assert ('HEAD', '/YukunZhou/RETFound_mae_meh/resolve/main/RETFound_mae_meh.pth') in _Hub.log


@pytest.mark.torch
def test_any_bare_name_is_fetched_from_yukunzhou_as_the_original(hub, tmp_path):
    """The original downloads YukunZhou/<NAME>/<NAME>.pth for any --finetune NAME, not only the six
    it documents (a later release works without a new port); a name that is neither on the Hub nor
    a file says so, listing the published names."""
    endpoint, data = hub
    res = _run(['RETFound_mae_later', 'RETFound_mae_typo'], {'HF_ENDPOINT': endpoint}, tmp_path)
    assert bytes.fromhex(res['RETFound_mae_later']['bytes']) == data
    err = res['RETFound_mae_typo']['error']
    assert 'YukunZhou/RETFound_mae_typo was not found' in err and 'nor an existing file' in err
    assert 'RETFound_mae_natureCFP' in err and 'local .pth' in err
    assert ('HEAD', '/YukunZhou/RETFound_mae_typo/resolve/main/RETFound_mae_typo.pth') in _Hub.log


def _prepare_cache(root, name, data):
    repo = root / f'models--YukunZhou--{name}'
    snap = repo / 'snapshots' / COMMIT
    snap.mkdir(parents=True)
    (snap / f'{name}.pth').write_bytes(data)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(COMMIT)  # no trailing newline


@pytest.mark.torch
def test_offline_cache_and_nothing_cached(tmp_path):
    data = _tiny_pth_bytes(tmp_path)
    _prepare_cache(tmp_path / 'hf_home' / 'hub', 'RETFound_mae_meh', data)
    res = _run(['RETFound_mae_meh', 'RETFound_mae_natureOCT'],
               {'HF_HUB_OFFLINE': '1', 'HF_ENDPOINT': 'http://127.0.0.1:9'}, tmp_path)
    assert bytes.fromhex(res['RETFound_mae_meh']['bytes']) == data
    err = res['RETFound_mae_natureOCT']['error']
    assert 'not in the local Hugging Face cache' in err and 'hf auth login' in err and 'local .pth' in err


def test_offline_nothing_cached(tmp_path):
    """Nothing cached and no way to download (HF_HUB_OFFLINE=1 and a closed port as endpoint;
    without HF_HUB_OFFLINE huggingface_hub retries ~23 s before giving the same error)."""
    res = _run(['RETFound_dinov2_shanghai'], {'HF_ENDPOINT': 'http://127.0.0.1:9', 'HF_HUB_OFFLINE': '1'}, tmp_path)
    assert 'could not download YukunZhou/RETFound_dinov2_shanghai' in res['RETFound_dinov2_shanghai']['error']
