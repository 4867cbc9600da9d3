# --------------------------------------------------------
# Model benchmark: our MindSpore ViT train step and eval forward beside the PyTorch original's
# (timm 0.9.16 VisionTransformer as RETFound builds it + torch.optim.AdamW with layer decay).
# Written for this port; the torch side runs tests/original_reference.py (timm's own classes).
# --------------------------------------------------------
"""Train-step and eval images/s, first-step (compile) time and peak RSS, ours vs the original.

Every configuration (backend x model x train/eval x precision x batch) runs in its own child
process, so peak RSS is that configuration's alone (``ru_maxrss`` of the child, cross-checked by
the parent polling ``/proc/<pid>/status``). The parent kills a child above ``--mem_limit_gb`` or
``--timeout`` and records it as OOM/timeout. Configurations are interleaved (torch, ours, ours,
torch, ...) over ``--repeats`` rounds so both see the same background load; medians are reported.
Each configuration times ``--steps`` calls after its first call and ``--warmup`` untimed ones, so
that both sides are measured in steady state (the original's first few calls are slower).

    .venv/bin/python bench/bench_model.py --quick          # ViT-B/16 only, few steps (~20 min)
    .venv/bin/python bench/bench_model.py                  # ViT-B/16 and ViT-L/16 (~2-2.5 h on 2 cores)

``--device gpu`` runs both sides on CUDA (float16 as each one's 'fast' precision, peak GPU memory);
``--backends torch`` runs the original alone (a GPU machine without MindSpore's CUDA 11 stack).

The table is printed and written to bench/RESULTS.md (``--out``). Data-pipeline images/s come
from bench/bench_data.py's results file, bench/RESULTS_data.md, when it exists.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (our factory, embed_dim, depth, num_heads)
MODELS = {
    'vit_base_patch16': ('vit_base_patch16', 768, 12, 12),
    'vit_large_patch16': ('vit_large_patch16', 1024, 24, 16),
}
IMG, PATCH, NUM_CLASSES, DROP_PATH = 224, 16, 5, 0.2  # RETFound fine-tune defaults (drop_path 0.2)
LAYER_DECAY, WEIGHT_DECAY, LR = 0.65, 0.05, 5e-4


# ---------------------------------------------------------------------------
# FLOPs and machine
# ---------------------------------------------------------------------------
def vit_flops_per_image(embed_dim, depth, img=IMG, patch=PATCH, mlp_ratio=4):
    """Forward multiply-adds x 2 of the GEMMs (patch embed, qkv, attention, proj, MLP, head)."""
    n = (img // patch) ** 2 + 1
    d = embed_dim
    per_block = 2 * n * d * (3 * d + d + 2 * mlp_ratio * d) + 2 * 2 * n * n * d
    return depth * per_block + 2 * (n - 1) * (3 * patch * patch) * d + 2 * d * NUM_CLASSES


def machine_info():
    cpu = platform.processor() or '?'
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    ram = 0.0
    try:
        with open('/proc/meminfo') as f:
            ram = int(f.readline().split()[1]) / 2 ** 20
    except OSError:
        pass
    return {'cpu': cpu, 'cores': os.cpu_count(), 'ram_gb': ram, 'date': datetime.date.today().isoformat()}


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float('nan')


# ---------------------------------------------------------------------------
# Workers (run in a child process: ``bench_model.py --worker JSON``)
# ---------------------------------------------------------------------------
def _peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


def worker_sgemm(cfg):
    """Best-of GFLOP/s of a large matmul: on the CPU fp32 through numpy's BLAS and torch's; on a GPU
    (``device`` 'gpu') torch's fp32 (TF32 off, torch's default) and fp16 matmuls on CUDA, and the GPU's name."""
    import numpy as np
    if cfg.get('device') == 'gpu':
        import torch
        n = cfg.get('n', 8192)
        best = {'gpu_name': torch.cuda.get_device_name(0)}
        for name, dt in (('torch_fp32', torch.float32), ('torch_fp16', torch.float16)):
            a = torch.randn(n, n, device='cuda', dtype=dt)
            b = torch.randn(n, n, device='cuda', dtype=dt)

            def mm():
                torch.matmul(a, b)
                torch.cuda.synchronize()
            _, times = _timed(mm, 10)
            best[name] = 2 * n ** 3 / min(times) / 1e9
        return best
    n = cfg.get('n', 4096)
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)

    def gflops(x, y):  # one warm-up, best of 3
        _, times = _timed(lambda: x @ y, 3)
        return 2 * n ** 3 / min(times) / 1e9

    best = {'numpy': gflops(a, b)}
    try:
        import torch
        best['torch'] = gflops(torch.from_numpy(a), torch.from_numpy(b))
    except ImportError:
        pass
    return best


def _inputs(batch, seed=0):
    import numpy as np
    rs = np.random.RandomState(seed)
    x = rs.standard_normal((batch, 3, IMG, IMG)).astype(np.float32)
    y = rs.randint(0, NUM_CLASSES, (batch,)).astype(np.int64)
    return x, y


def _timed(fn, steps, warmup=0):
    """(first call seconds, list of `steps` call seconds after `warmup` untimed calls that follow the first)."""
    s = time.perf_counter()
    fn()
    first = time.perf_counter() - s
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - s)
    return first, times


def worker_ms(cfg):
    import numpy as np
    import mindspore as ms
    gpu = cfg.get('device') == 'gpu'
    ms.set_device('GPU' if gpu else 'CPU')
    ms.set_context(mode=ms.PYNATIVE_MODE if cfg.get('ms_mode') == 'pynative' else ms.GRAPH_MODE)
    for k, v in cfg.get('ms_context', {}).items():  # experiments: e.g. {"memory_optimize_level": "O1"}
        ms.set_context(**{k: v})
    import models_vit_mindspore as models
    from util_mindspore import cpu_kernels
    # --cpu_bf16 of main_finetune_mindspore.py: Linear GEMMs in bf16 (fp32 accumulation)
    cpu_kernels.set_bf16_matmul(cfg['precision'] == 'cpu_bf16')
    np.random.seed(0)
    factory = MODELS[cfg['model']][0]
    model = getattr(models, factory)(img_size=IMG, num_classes=NUM_CLASSES, drop_path_rate=DROP_PATH,
                                     global_pool=True)
    if cfg.get('ms_recompute'):
        for blk in model.blocks:
            blk.recompute()
    x, y = _inputs(cfg['batch'])
    loss_scaler = None
    if cfg['precision'] == 'fp16':
        from util_mindspore.optim import LossScaler
        ms.amp.auto_mixed_precision(model, cfg.get('amp_level', 'O2'), dtype=ms.float16)
        loss_scaler = LossScaler()
    elif cfg['precision'] == 'bf16':
        ms.amp.auto_mixed_precision(model, cfg.get('amp_level', 'O2'), dtype=ms.bfloat16)
    if cfg['task'] == 'train':
        from util_mindspore.lr_decay import param_groups_lrd
        from util_mindspore.optim import AdamW
        from engine_finetune_mindspore import Stepper
        model.set_train(True)
        opt = AdamW(param_groups_lrd(model, WEIGHT_DECAY, model.no_weight_decay(), LAYER_DECAY), lr=LR)
        stepper = Stepper(model, opt, accum_iter=1, clip_grad=cfg.get('clip_grad'), loss_scaler=loss_scaler)
        y = y.astype(np.int32)

        def step():
            return float(stepper(x, y, LR).asnumpy())
    else:
        model.set_train(False)
        xt = ms.Tensor(x)

        def step():
            return model(xt).asnumpy()
    # evaluation runs inside frozen_weights(model), as engine predict() does (--cpu_bf16: bf16 weights
    # packed once; fp32: the weights packed in place; both before the first, untimed call)
    with (cpu_kernels.frozen_weights(model) if cfg['task'] == 'eval' else contextlib.nullcontext()):
        first, times = _timed(step, cfg['steps'], cfg.get('warmup', 0))
    out = {'first_s': first, 'times': times, 'peak_rss_gb': _peak_rss_gb()}
    if gpu:  # (asnumpy() above waited for the device)
        out['peak_dev_gb'] = ms.runtime.max_memory_allocated() / 2 ** 30
    return out


def worker_torch(cfg):
    import torch
    from tests.original_reference import retfound_vit, lr_decay_param_groups
    gpu = cfg.get('device') == 'gpu'
    dev = 'cuda' if gpu else 'cpu'
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the CPUs this process may use, as our pool
    torch.manual_seed(0)
    _, dim, depth, heads = MODELS[cfg['model']]
    model = retfound_vit(global_pool=True, img_size=IMG, patch_size=PATCH, embed_dim=dim, depth=depth,
                         num_heads=heads, num_classes=NUM_CLASSES, drop_path_rate=DROP_PATH).to(dev)
    x, y = _inputs(cfg['batch'])
    x, y = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
    # 'bf16': torch.autocast('cpu', bfloat16) on the CPU; 'fp16': the original's own
    # torch.cuda.amp.autocast() (float16) with its GradScaler, on a GPU
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(cfg['precision'])
    if cfg['task'] == 'train':
        model.train(True)
        groups = lr_decay_param_groups(model, WEIGHT_DECAY, model.no_weight_decay(), LAYER_DECAY)
        for g in groups:
            g['lr'] = LR * g['lr_scale']  # what util/lr_sched.adjust_learning_rate sets
        opt = torch.optim.AdamW(groups, lr=LR)
        criterion = torch.nn.CrossEntropyLoss()
        clip = cfg.get('clip_grad')
        params = [p for p in model.parameters() if p.requires_grad]
        # misc.NativeScalerWithGradNormCount: a GradScaler that is enabled only for CUDA fp16
        scaler = torch.amp.GradScaler(dev, enabled=gpu and amp_dtype == torch.float16)

        def step():
            # engine_finetune.py train_one_epoch + NativeScalerWithGradNormCount: forward, loss,
            # (scaled) backward, unscale, clip or grad norm, step, update, zero_grad.
            with torch.autocast(dev, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss = criterion(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            else:
                torch.norm(torch.stack([torch.norm(p.grad.detach(), 2.0) for p in params]), 2.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            return loss.item()  # (waits for the GPU)
    else:
        model.eval()

        def step():
            return model(x).float().cpu().numpy()  # (waits for the GPU)
    if cfg['task'] == 'eval':
        # One autocast region around all timed batches: autocast keeps its low-precision copies of
        # the weights until the region ends, so they are cast once, as ours are packed once inside
        # frozen_weights() (one region per batch re-cast ViT-L's 300M weights every step, 0.04-0.2 s
        # of a ~3 s step: an advantage for our side that the comparison should not have).
        with torch.no_grad(), torch.autocast(dev, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            first, times = _timed(step, cfg['steps'], cfg.get('warmup', 0))
    else:
        first, times = _timed(step, cfg['steps'], cfg.get('warmup', 0))
    out = {'first_s': first, 'times': times, 'peak_rss_gb': _peak_rss_gb()}
    if gpu:
        out['peak_dev_gb'] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def run_worker(cfg):
    fn = {'ms': worker_ms, 'torch': worker_torch, 'sgemm': worker_sgemm}[cfg['backend']]
    try:
        out = fn(cfg)
        out['ok'] = True
    except Exception as e:  # reported in the table as "error", the message kept in the JSON
        out = {'ok': False, 'error': f'{type(e).__name__}: {str(e)[:300]}', 'peak_rss_gb': _peak_rss_gb()}
    print('RESULT ' + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------
# Parent: run one configuration in a child with a timeout and a memory guard
# ---------------------------------------------------------------------------
def _tree_rss_gb(pid):
    """RSS of pid and its descendants (GiB), from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f'/proc/{p}/status') as f:
                for line in f:
                    if line.startswith('VmRSS:'):
                        total += int(line.split()[1])
            with open(f'/proc/{p}/task/{p}/children') as f:
                stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            pass
    return total / 2 ** 20


def run_child(cfg, timeout, mem_limit_gb, verbose=True):
    env = dict(os.environ, PYTHONWARNINGS='ignore', GLOG_v='3')
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--worker', json.dumps(cfg)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    t0, polled, status = time.time(), 0.0, None
    while proc.poll() is None:
        time.sleep(0.25)
        polled = max(polled, _tree_rss_gb(proc.pid))
        if polled > mem_limit_gb:
            status = f'OOM>{mem_limit_gb:g}GB'
        elif time.time() - t0 > timeout:
            status = f'timeout>{timeout:g}s'
        if status:
            os.killpg(proc.pid, 9)
            proc.wait()
            break
    out = proc.stdout.read()
    res = None
    for line in out.splitlines():
        if line.startswith('RESULT '):
            res = json.loads(line[7:])
    if res is None:
        res = {'ok': False, 'error': status or f'exit {proc.returncode}: {out[-300:]}'}
    res['polled_rss_gb'] = polled
    res['wall_s'] = time.time() - t0
    res['load'] = load_average()
    if verbose:
        brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items() if k != 'times'}
        if res.get('times'):
            brief['step_s'] = [round(t, 2) for t in res['times']]
        print(f"  {cfg['backend']:5s} {cfg['model']} {cfg['task']} {cfg['precision']} b{cfg['batch']}: {brief}",
              flush=True)
    return res


# ---------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------
DATA_RESULTS = os.path.join(ROOT, 'bench', 'RESULTS_data.md')


def data_pipeline_section(path=DATA_RESULTS):
    """The data-pipeline table bench/bench_data.py wrote (its machine, date and command included),
    to stand next to the model images/s; a pointer when it has not been run."""
    try:
        with open(path, encoding='utf-8') as f:
            body = [line.rstrip('\n') for line in f]
    except OSError:
        return ['Data pipeline images/s: run `bench/bench_data.py` (writes bench/RESULTS_data.md).']
    if body and body[0].startswith('# '):
        body = body[1:]  # its own title
    while body and not body[0].strip():
        body = body[1:]
    return ['## Data pipeline images/s (`bench/bench_data.py`, bench/RESULTS_data.md)', ''] + body


def _fmt(v, f='{:.2f}'):
    return '—' if v is None else f.format(v)


def summarise(results, peaks):
    """results: {(model, task, precision, batch): {'torch': [res...], 'ms-graph': [...], ...}} -> rows,
    one per MindSpore mode, each against the same torch runs (one row with mode '-' when only the
    original ran). peaks: {'fp32': GFLOP/s, 'fast': GFLOP/s} the "% peak" of each precision is taken
    against (on the CPU both are the fp32 sgemm peak)."""
    rows = []
    for (model, task, prec, batch), by_all in results.items():
        dim, depth = MODELS[model][1], MODELS[model][2]
        flops = vit_flops_per_image(dim, depth) * (3 if task == 'train' else 1)
        peak_gflops = peaks.get('fp32' if prec == 'fp32' else 'fast')
        ms_keys = sorted(k for k in by_all if k.startswith('ms-')) or ['ms--']
        for ms_key in ms_keys:
            by = {'ms': by_all.get(ms_key, []), 'torch': by_all.get('torch', [])}
            row = {'model': model, 'task': task, 'precision': prec, 'batch': batch, 'mode': ms_key[3:],
                   'prec_names': tuple(by[be][0].get('precision', '') if by[be] else '—' for be in ('ms', 'torch'))}
            for be in ('ms', 'torch'):
                runs = [r for r in by[be] if r.get('ok')]
                if not runs:
                    errs = [r.get('error', '?') for r in by[be]]
                    row[be] = {'error': errs[0][:60] if errs else 'not run'}
                    continue
                step = statistics.median(statistics.median(r['times']) for r in runs)
                ips = batch / step
                # on a GPU the device's peak allocated memory, on the CPU the process's peak RSS
                mem = max(r['peak_dev_gb'] if 'peak_dev_gb' in r else max(r['peak_rss_gb'], r['polled_rss_gb'])
                          for r in runs)
                row[be] = {'ips': ips, 'first_s': statistics.median(r['first_s'] for r in runs),
                           'step_s': step, 'rss': mem,
                           'peak_frac': ips * flops / 1e9 / peak_gflops if peak_gflops else None,
                           'runs_ips': [batch / statistics.median(r['times']) for r in runs]}
            rows.append(row)
    return rows


def peaks_of(sgemm):
    """The "% peak" denominators: on a GPU fp32 rows against the fp32 matmul, 'fast' rows against
    the fp16 one; on the CPU both against the best fp32 sgemm (as this table always did)."""
    if 'torch_fp16' in sgemm:
        return {'fp32': sgemm.get('torch_fp32'), 'fast': sgemm['torch_fp16']}
    best = max((v for v in sgemm.values() if isinstance(v, (int, float))), default=None)
    return {'fp32': best, 'fast': best}


def render(rows, machine, sgemm, args, data_section, notes):
    gpu = 'torch_fp16' in sgemm
    mem = 'peak GPU mem' if gpu else 'RSS'
    where = (f"{sgemm.get('gpu_name', 'GPU')} (host: {machine['cpu']}, {machine['cores']} cores)" if gpu else
             f"{machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']:.1f} GiB RAM")
    peak_line = (f"- Matmul peaks (8192^3 on the GPU through torch, best of 10): fp32 (TF32 off, torch's default) "
                 f"{sgemm.get('torch_fp32', 0) / 1e3:.1f} TFLOP/s, fp16 {sgemm['torch_fp16'] / 1e3:.0f} TFLOP/s; "
                 f"\"% peak\" of fp32 rows is against the first, of fast (fp16) rows against the second." if gpu else
                 "- fp32 matmul peak (4096^3 sgemm, best of): " +
                 ', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in sgemm.items()) + '.')
    lines = [f"# Model benchmark: MindSpore port vs PyTorch original (timm {args.timm_version})", '',
             f"- Machine: {where}; "
             f"date {machine['date']}; MindSpore {args.ms_version}, torch {args.torch_version}.",
             peak_line,
             f"- Mode: {'--quick' if args.quick else 'full'}; {args.repeats} interleaved round(s); "
             f"{args.steps} timed steps after the first" +
             (f" and {args.warmup} untimed warm-up call(s)" if args.warmup else '') + "; load average during runs "
             f"{args.load_min:.1f}–{args.load_max:.1f} (>{machine['cores']} means other processes competed).",
             '- images/s = batch / median step time; "first" = first call (MindSpore: includes graph '
             'compile); ' + ('peak GPU mem = the framework\'s peak allocated device memory '
                             '(torch.cuda.max_memory_allocated, mindspore.runtime.max_memory_allocated); '
                             if gpu else 'RSS = peak resident memory of that configuration\'s own process; ') +
             '"% peak" = model GFLOP/s (fwd ≈ GEMM FLOPs, train = 3× fwd) / matmul peak.', '']
    lines += ['| model | task | ours mode | prec (ours/orig) | batch | ours img/s | orig img/s | ratio | ours first (s) | '
              f'orig first (s) | ours {mem} GB | orig {mem} GB | {mem} ratio | ours % peak | orig % peak |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        o, t = r['ms'], r['torch']
        if 'error' in o or 'error' in t:
            lines.append(f"| {r['model']} | {r['task']} | {r['mode']} | {'/'.join(r['prec_names'])} | {r['batch']} | "
                         f"{_fmt(o.get('ips'))} {o.get('error', '')} | {_fmt(t.get('ips'))} {t.get('error', '')} | "
                         f"— | {_fmt(o.get('first_s'), '{:.1f}')} | {_fmt(t.get('first_s'), '{:.1f}')} | "
                         f"{_fmt(o.get('rss'), '{:.1f}')} | {_fmt(t.get('rss'), '{:.1f}')} | — | "
                         f"{_fmt(o.get('peak_frac') and 100 * o['peak_frac'], '{:.0f}%')} | "
                         f"{_fmt(t.get('peak_frac') and 100 * t['peak_frac'], '{:.0f}%')} |")
            continue
        lines.append(f"| {r['model']} | {r['task']} | {r['mode']} | {'/'.join(r['prec_names'])} | {r['batch']} | {o['ips']:.2f} | "
                     f"{t['ips']:.2f} | **{o['ips'] / t['ips']:.2f}** | {o['first_s']:.1f} | {t['first_s']:.1f} | "
                     f"{o['rss']:.1f} | {t['rss']:.1f} | **{o['rss'] / t['rss']:.2f}** | "
                     f"{_fmt(o['peak_frac'] and 100 * o['peak_frac'], '{:.0f}%')} | "
                     f"{_fmt(t['peak_frac'] and 100 * t['peak_frac'], '{:.0f}%')} |")
    lines.append('')
    lines += data_section
    lines += [''] + notes
    return '\n'.join(lines) + '\n'


def _version(name):
    import importlib.metadata as md
    try:
        return md.version(name)
    except md.PackageNotFoundError:  # e.g. no MindSpore on a GPU machine that runs --backends torch
        return 'not installed'


def measure(args, models):
    """Run every configuration in its own child process; fills args' version and load fields."""
    args.ms_version, args.torch_version, args.timm_version = (_version(n) for n in ('mindspore', 'torch', 'timm'))
    machine = machine_info()
    loads = [load_average()]
    print(f"machine: {machine}, load {loads[0]:.1f}", flush=True)
    sg = run_child({'backend': 'sgemm', 'model': '-', 'task': '-', 'precision': 'fp32', 'batch': 0,
                    'device': args.device}, 300, args.mem_limit_gb)
    sgemm = {k: v for k, v in sg.items() if k in ('numpy', 'torch', 'torch_fp32', 'torch_fp16', 'gpu_name')}
    # the 'fast' precision of each backend: on the CPU torch's bf16 autocast and our --ms_fast; on a
    # GPU the original's float16 autocast + GradScaler and our float16 O2 + loss scaling
    fast = {'torch': 'fp16', 'ms': 'fp16'} if args.device == 'gpu' else {'torch': 'bf16', 'ms': args.ms_fast}
    backends = args.backends.split(',')

    configs = []
    for m in models:
        for task in args.tasks.split(','):
            for prec in args.precisions.split(','):
                batch = args.eval_batch if task == 'eval' else (
                    args.batch_large if m == 'vit_large_patch16' else args.batch_base)
                configs.append((m, task, prec, batch))
    results = {}
    for rnd in range(args.repeats):
        for i, (m, task, prec, batch) in enumerate(configs):
            order = ('torch', 'ms') if (rnd + i) % 2 == 0 else ('ms', 'torch')
            for be in (b for b in order if b in backends):
                precision = prec if prec == 'fp32' else fast[be]
                key = (m, task, prec, batch)
                cfg = {'backend': be, 'model': m, 'task': task, 'precision': precision, 'batch': batch,
                       'steps': args.steps, 'warmup': args.warmup, 'device': args.device}
                for mode in (args.ms_modes.split(',') if be == 'ms' else ['-']):
                    if be == 'ms':
                        cfg['ms_mode'] = mode
                    res = run_child(cfg, args.timeout, args.mem_limit_gb)
                    res['precision'] = precision
                    results.setdefault(key, {}).setdefault(be if be == 'torch' else f'ms-{mode}', []).append(res)
                    loads.append(res['load'])
    args.load_min, args.load_max = min(loads), max(loads)
    return machine, sgemm, results


RUN_FIELDS = ('quick', 'repeats', 'steps', 'warmup', 'ms_fast', 'load_min', 'load_max', 'ms_version', 'torch_version',
              'timm_version', 'device', 'backends')


def load_json(args):
    """--from_json: the results of an earlier run (its --json file), to render the table again."""
    with open(args.from_json) as f:
        saved = json.load(f)
    results = {}
    for k, v in saved['results'].items():
        m, task, prec, batch = k.split('|')
        results[(m, task, prec, int(batch))] = v
    args.warmup = 0  # files from before --warmup existed timed the calls right after the first
    if 'run' in saved:
        for k, v in saved['run'].items():
            setattr(args, k, v)
    else:  # a file from before 'run' was saved: rounds and steps are the command line's
        loads = [r['load'] for by in results.values() for runs in by.values() for r in runs if 'load' in r]
        args.load_min, args.load_max = (min(loads), max(loads)) if loads else (float('nan'),) * 2
        args.ms_version, args.torch_version, args.timm_version = (
            _version(n) for n in ('mindspore', 'torch', 'timm'))
    return saved['machine'], saved['sgemm'], results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--worker', help=argparse.SUPPRESS)
    p.add_argument('--quick', action='store_true', help='ViT-B/16 only, fewer steps')
    p.add_argument('--models', default=None, help='comma list (default: ViT-B; full mode adds ViT-L)')
    p.add_argument('--batch_base', type=int, default=8)
    p.add_argument('--batch_large', type=int, default=8)
    p.add_argument('--eval_batch', type=int, default=16)
    p.add_argument('--steps', type=int, default=None, help='timed steps after the first (quick 3, full 4)')
    p.add_argument('--warmup', type=int, default=3,
                   help='untimed calls between the first and the timed steps (default 3): the original warms up '
                        'over its first calls (glibc malloc serves its large activations with fresh mmap pages '
                        'until its dynamic mmap threshold has risen; ViT-L/16 bf16 eval took 3.7, 3.6, 3.1, 3.0, '
                        '2.9 s for its first five batches), so steady-state times need them')
    p.add_argument('--repeats', type=int, default=None, help='interleaved rounds (quick 1, full 2)')
    p.add_argument('--precisions', default='fp32,fast',
                   help="'fast' = torch bf16 autocast / ours --ms_fast")
    p.add_argument('--ms_fast', default='cpu_bf16', choices=['cpu_bf16', 'fp16'],
                   help="our 'fast' precision: cpu_bf16 = main's --cpu_bf16 (bf16 GEMMs in the Linear layers, "
                        "fp32 accumulation); fp16 = auto_mixed_precision O2 + loss scaling")
    p.add_argument('--tasks', default='train,eval')
    p.add_argument('--ms_modes', default='graph,pynative',
                   help='MindSpore execution modes to time (each against the same torch runs)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'gpu'],
                   help="cpu (default), or gpu: both sides on CUDA (ours MindSpore device_target GPU), "
                        "'fast' = float16 on both, memory = peak allocated GPU memory")
    p.add_argument('--backends', default='torch,ms',
                   help="which sides to run: 'torch,ms' (default), or one of them (e.g. 'torch' on a GPU "
                        "machine without MindSpore's CUDA stack: the original's numbers and %% peak alone)")
    p.add_argument('--timeout', type=float, default=1500, help='seconds per configuration')
    p.add_argument('--mem_limit_gb', type=float, default=20.0)
    p.add_argument('--out', default=os.path.join(ROOT, 'bench', 'RESULTS.md'))
    p.add_argument('--json', default=None, help='also dump raw results here')
    p.add_argument('--from_json', default=None,
                   help='render the table from an earlier run\'s --json file instead of measuring '
                        '(e.g. after bench/bench_data.py, to add its data-pipeline table)')
    args = p.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker))
        return
    models = args.models.split(',') if args.models else (
        ['vit_base_patch16'] if args.quick else ['vit_base_patch16', 'vit_large_patch16'])
    args.steps = args.steps or (3 if args.quick else 4)
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.from_json:
        machine, sgemm, results = load_json(args)
    else:
        machine, sgemm, results = measure(args, models)
    rows = summarise(results, peaks_of(sgemm))
    ours_fast = ('`--cpu_bf16` (the GEMMs of the Linear layers and the attention core with bf16 inputs, fp32 '
                 'accumulation and outputs, through oneDNN; everything else fp32)' if args.ms_fast == 'cpu_bf16' else
                 'float16 `auto_mixed_precision(O2)` + dynamic loss scaling (2.10 has no CPU bf16 kernels)')
    if args.device == 'cpu':
        notes = ['"fast" precision: torch = `torch.autocast("cpu", dtype=torch.bfloat16)` (the CPU has avx512_bf16; '
                 'evaluation in one autocast region, so torch casts its weights once as ours are packed once); '
                 f'MindSpore = {ours_fast}.']
    else:
        notes = ['"fast" precision on the GPU: torch = the original\'s `torch.cuda.amp.autocast()` (float16) with '
                 'its GradScaler (`NativeScalerWithGradNormCount`); MindSpore = float16 `auto_mixed_precision(O2)` '
                 '+ dynamic loss scaling (main\'s `--amp_level O2`). fp32 = no autocast (TF32 off for matmuls, '
                 'torch\'s default).']
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'machine': machine, 'sgemm': sgemm,
                       'run': {k: getattr(args, k) for k in RUN_FIELDS},
                       'results': {'|'.join(map(str, k)): v for k, v in results.items()}}, f, indent=1)
    # the data pipeline is measured on the CPU by bench_data.py: its table belongs beside CPU runs only
    data_section = data_pipeline_section() if args.device == 'cpu' else []
    table = render(rows, machine, sgemm, args, data_section, notes)
    print('\n' + table)
    with open(args.out, 'w') as f:
        f.write(table)
    print(f'written to {args.out}')


if __name__ == '__main__':
    main()
