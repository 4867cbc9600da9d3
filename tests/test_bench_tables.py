"""The benchmark scripts' table code (not a timing test: nothing here is measured).

bench/bench_model.py --from_json re-renders an earlier run's raw results; the ratio column must be
ours / original from those numbers, and the data-pipeline table that bench/bench_data.py wrote must
stand under the model table.
"""
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import bench_model  # noqa: E402


def _run(backend_times, rss, load=1.0):
    return {'ok': True, 'times': backend_times, 'first_s': 5.0, 'peak_rss_gb': rss, 'polled_rss_gb': rss - 0.1,
            'wall_s': 20.0, 'load': load}


def test_from_json_renders_ratios_of_the_saved_runs_and_the_data_table(tmp_path):
    saved = {
        'machine': {'cpu': 'Test CPU', 'cores': 2, 'ram_gb': 8.0, 'date': '2026-01-01'},
        'sgemm': {'numpy': 200.0, 'torch': 180.0},
        'results': {'vit_base_patch16|eval|fp32|16': {
            'torch': [_run([4.0, 4.2, 4.1], 1.2), _run([4.3, 4.1, 4.0], 1.25, load=2.5)],
            'ms-graph': [_run([3.2, 3.2, 3.3], 1.1), _run([3.1, 3.2, 3.2], 1.0)]}},
    }
    js = tmp_path / 'run.json'
    js.write_text(json.dumps(saved))
    data = tmp_path / 'RESULTS_data.md'
    data.write_text('# Data pipeline benchmark: x\n\n- Machine: Test CPU\n\n| pipeline | epoch |\n|---|---|\n'
                    '| eval (resize+crop) | 2..3 |\n')
    out = tmp_path / 'RESULTS.md'
    rows = bench_model.summarise({('vit_base_patch16', 'eval', 'fp32', 16): saved['results']
                                  ['vit_base_patch16|eval|fp32|16']}, {'fp32': 200.0, 'fast': 200.0})
    ours, orig = rows[0]['ms']['ips'], rows[0]['torch']['ips']
    assert abs(ours - 16 / 3.2) < 1e-9 and abs(orig - 16 / 4.1) < 1e-9  # medians of medians
    def render(*args):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'bench_model.py'), *args],
                              capture_output=True, text=True, cwd=str(tmp_path), timeout=120,
                              env=dict(os.environ, PYTHONPATH=ROOT))
        assert proc.returncode == 0, proc.stderr[-2000:]

    # a file without the run's settings (older runs): rounds and steps from the command line; saved
    # again with --json it carries them, and renders the same table on its own
    render('--from_json', str(js), '--out', str(out), '--repeats', '2', '--steps', '3',
           '--json', str(tmp_path / 'again.json'))
    render('--from_json', str(tmp_path / 'again.json'), '--out', str(tmp_path / 'again.md'))
    text = out.read_text()
    assert (tmp_path / 'again.md').read_text() == text
    assert '2 interleaved round(s); 3 timed steps' in text
    assert 'Test CPU, 2 cores' in text and 'load average during runs 1.0–2.5' in text
    row = next(line for line in text.splitlines() if line.startswith('| vit_base_patch16 | eval | graph'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[5:8] == [f'{ours:.2f}', f'{orig:.2f}', f'**{ours / orig:.2f}**']
    assert cells[12] == f'**{1.1 / 1.25:.2f}**'  # peak RSS: max of ru_maxrss and the polled value
    # no data results next to the script in this temporary layout: bench_model reads ROOT's file,
    # so check the section builder directly on ours
    section = bench_model.data_pipeline_section(str(data))
    assert section[0].startswith('## Data pipeline') and '| eval (resize+crop) | 2..3 |' in section
    assert not any(line.startswith('# ') for line in section)
    assert 'run `bench/bench_data.py`' in bench_model.data_pipeline_section(str(tmp_path / 'missing.md'))[0]


def test_gpu_run_of_the_original_alone_renders_its_committed_table(tmp_path):
    """bench/RESULTS_gpu_original_b16.json: the original alone on an H100 (``--device gpu --backends
    torch``; MindSpore 2.10's CUDA 11 backend cannot run there). Re-rendered, it gives the committed
    table; "% peak" of fp32 rows is against the fp32 matmul, of fp16 rows against the fp16 one; the
    memory column is the GPU's peak allocation; our side reads "not run" with no ratio."""
    js = os.path.join(ROOT, 'bench', 'RESULTS_gpu_original_b16.json')
    out = tmp_path / 'gpu.md'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'bench_model.py'), '--from_json', js,
                           '--out', str(out)], capture_output=True, text=True, cwd=str(tmp_path), timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    with open(os.path.join(ROOT, 'bench', 'RESULTS_gpu_original_b16.md'), encoding='utf-8') as f:
        assert text == f.read()
    with open(js) as f:
        saved = json.load(f)
    assert 'Data pipeline' not in text  # measured on the CPU, not beside a GPU run
    for key, by in saved['results'].items():
        model, task, prec, batch = key.split('|')
        runs = by['torch']
        assert len(runs) == 1  # one round: images/s = batch / the median of its timed steps
        step = statistics.median(runs[0]['times'])
        ips = int(batch) / step
        dim, depth = bench_model.MODELS[model][1:3]
        flops = bench_model.vit_flops_per_image(dim, depth) * (3 if task == 'train' else 1)
        peak = saved['sgemm']['torch_fp32' if prec == 'fp32' else 'torch_fp16']
        row = next(line for line in text.splitlines()
                   if line.startswith(f'| {model} | {task} | - | —/{runs[0]["precision"]} | {batch} |'))
        cells = [c.strip() for c in row.strip('|').split('|')]
        assert cells[5] == '— not run' and cells[7] == '—'
        assert cells[6] == f'{ips:.2f}'
        assert cells[11] == f"{runs[0]['peak_dev_gb']:.1f}"
        assert cells[14] == f'{100 * ips * flops / 1e9 / peak:.0f}%'


def test_warmup_calls_run_untimed_between_the_first_call_and_the_timed_steps(monkeypatch):
    """--warmup N: the first call is reported alone, N more calls run untimed, and only the calls
    after them are timed (the original's first batches are slower, docs/performance.md tenth pass)."""
    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr(bench_model.time, 'perf_counter', lambda: float(next(clock)))
    first, times = bench_model._timed(lambda: calls.append(len(calls)), steps=2, warmup=3)
    assert len(calls) == 1 + 3 + 2
    assert len(times) == 2
    # perf_counter is read twice per timed call (before and after) and never for the warm-up calls
    assert first == 1.0 and times == [1.0, 1.0]
    assert next(clock) == 6


def test_steady_state_run_renders_its_committed_table_with_its_warmup(tmp_path):
    """bench/RESULTS_vit_large_eval_bf16_steady.json (and the eleventh pass's fp32 file) re-render to the committed table, whose header
    names the run's warm-up calls; a file from before --warmup existed names none."""
    for name, warm in (('RESULTS_vit_large_eval_bf16_steady', ' and 3 untimed warm-up call(s);'),
                       ('RESULTS_vit_large_eval_fp32_packed', ' and 3 untimed warm-up call(s);'),
                       ('RESULTS_vit_large_eval_bf16_fair', None)):
        out = tmp_path / f'{name}.md'
        proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'bench_model.py'), '--from_json',
                               os.path.join(ROOT, 'bench', f'{name}.json'), '--out', str(out)],
                              capture_output=True, text=True, cwd=str(tmp_path), timeout=120,
                              env=dict(os.environ, PYTHONPATH=ROOT))
        assert proc.returncode == 0, proc.stderr[-2000:]
        text = out.read_text()
        if warm:
            with open(os.path.join(ROOT, 'bench', f'{name}.md'), encoding='utf-8') as f:
                assert text == f.read()
            assert warm in text
        else:  # (its notes under the table were reworded after it was rendered)
            assert '3 timed steps after the first; load average' in text and 'warm-up' not in text
