"""Data-parallel runs under msrun (2 CPU workers, backend mccl).

- The engine's Stepper with misc.make_grad_reducer keeps both ranks identical and equal to one
  process on the union batch; without the reducer the ranks diverge (the test can fail).
- A failing worker makes `msrun --join=True` fail, with the worker's error in its log.
- (slow) main_finetune_mindspore.py under msrun: only rank 0 writes; --dist_eval (and plain
  replicated eval) metrics equal a single-process evaluation of the same checkpoint.

Every launch runs in a temporary working directory (msrun and MindSpore write rank_*/ folders
there) on a free port, with the venv's bin first on PATH (msrun starts `python` from PATH).
"""
import csv
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
MAIN = os.path.join(ROOT, "main_finetune_mindspore.py")
BIN = os.path.dirname(sys.executable)
MSRUN = shutil.which("msrun", path=BIN) or shutil.which("msrun")

pytestmark = pytest.mark.skipif(MSRUN is None, reason="msrun (MindSpore's launcher) not found")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, **extra)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["GLOG_v"] = "3"  # MindSpore: errors only in the logs
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _run(cmd, cwd, timeout, env=None):
    try:
        return subprocess.run(cmd, cwd=cwd, env=_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # msrun's workers are in its process group: reported, not leaked
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{(e.stdout or '')[-3000:]}")


def msrun(script_args, workdir, log_dir, timeout=240, env=None):
    cmd = [MSRUN, "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "--join=True", f"--log_dir={log_dir}"] + list(script_args)
    return _run(cmd, workdir, timeout, env)


def python(script_args, workdir, timeout=180):
    return _run([sys.executable] + list(script_args), workdir, timeout)


def worker_logs(log_dir):
    out = {}
    for r in (0, 1):
        path = os.path.join(log_dir, f"worker_{r}.log")
        out[r] = pathlib.Path(path).read_text(encoding="utf-8", errors="replace") if os.path.isfile(path) else ""
    return out


def _explain(proc, log_dir=None):
    text = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    if log_dir:
        for r, log in worker_logs(log_dir).items():
            text += f"\n--- worker_{r}.log (tail) ---\n{log[-3000:]}"
    return text


def max_abs_diff(a, b):
    assert sorted(a.files) == sorted(b.files)
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a.files)


# ---------------------------------------------------------------------------
# 1. Gradient averaging: 2 ranks x 4 rows == 1 process x 8 rows
# ---------------------------------------------------------------------------
def test_data_parallel_steps_equal_single_process_and_ranks_stay_identical(tmp_path):
    single = python([WORKER, "--out", str(tmp_path / "single")], tmp_path)
    assert single.returncode == 0, _explain(single)
    dist = msrun([WORKER, "--out", str(tmp_path / "dist")], tmp_path, tmp_path / "log")
    assert dist.returncode == 0, _explain(dist, tmp_path / "log")

    s = np.load(tmp_path / "single" / "params_single.npz")
    r0 = np.load(tmp_path / "dist" / "params_rank0.npz")
    r1 = np.load(tmp_path / "dist" / "params_rank1.npz")
    assert len(s.files) == 32  # every parameter of the tiny ViT
    assert max_abs_diff(r0, r1) <= 1e-7
    assert max_abs_diff(r0, s) <= 1e-6

    # negative control (same launch, second run): without the reducer the ranks drift apart
    c0 = np.load(tmp_path / "dist" / "ctrl_rank0.npz")
    c1 = np.load(tmp_path / "dist" / "ctrl_rank1.npz")
    assert max_abs_diff(c0, c1) > 1e-4


# ---------------------------------------------------------------------------
# 2. A failing worker fails the launch
# ---------------------------------------------------------------------------
def test_failing_worker_fails_msrun_with_the_error_in_its_log(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):  # no test/
        (data / split / "a").mkdir(parents=True)
    proc = msrun([MAIN, "--model", "vit_tiny_patch16", "--input_size", "32", "--nb_classes", "1",
                  "--epochs", "1", "--batch_size", "4", "--num_workers", "1", "--device", "CPU",
                  "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
                  "--log_dir", str(tmp_path / "tb")], tmp_path, tmp_path / "log", timeout=180,
                 # the scheduler waits for a dead worker's heartbeat timeout (30 s by default)
                 env={"MS_NODE_TIMEOUT": "5"})
    assert proc.returncode != 0, _explain(proc, tmp_path / "log")
    logs = worker_logs(tmp_path / "log")
    expected = f"Data error: {data} has no test/ folder(s)"
    assert any(expected in log for log in logs.values()), _explain(proc, tmp_path / "log")
    assert not (tmp_path / "out" / "checkpoint-best.ckpt").exists()


# ---------------------------------------------------------------------------
# 3. The CLI under msrun: rank-0-only outputs, distributed evaluation == single process
# ---------------------------------------------------------------------------
def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [[float(v) for v in row] for row in rows[1:]]


def _make_data(out):
    proc = python([os.path.join(ROOT, "tools", "make_demo_data.py"), "--out", str(out), "--train", "8",
                   "--val", "4", "--test", "4", "--size", "64"], ROOT, timeout=60)
    assert proc.returncode == 0, _explain(proc)


TINY_CLI = ["--model", "vit_tiny_patch16", "--input_size", "32", "--nb_classes", "3", "--batch_size", "4",
            "--num_workers", "1", "--device", "CPU", "--task", "t"]


@pytest.mark.slow
def test_main_under_msrun_rank0_writes_and_dist_eval_equals_single_process(tmp_path):
    data = tmp_path / "data"
    _make_data(data)
    out = tmp_path / "out"
    # two epochs: the final test loads the best checkpoint, which rank 0 may have just rewritten;
    # every rank must test rank 0's best weights (they are sent from rank 0, not read by each rank)
    train = msrun([MAIN] + TINY_CLI + ["--epochs", "2", "--warmup_epochs", "1", "--dist_eval",
                                       "--data_path", str(data), "--output_dir", str(out),
                                       "--log_dir", str(tmp_path / "tb")], tmp_path, tmp_path / "log_train")
    assert train.returncode == 0, _explain(train, tmp_path / "log_train")

    task = out / "t"
    # rank 0 only: appended files have exactly one row per epoch, one TensorBoard event file,
    # no leftover temporary checkpoint files
    with open(task / "log.txt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for mode, n in (("val", 2), ("test", 1)):
        header, values = _read_csv(task / f"metrics_{mode}.csv")
        assert header[0] == "val_loss" and len(values) == n, (mode, values)
    assert len(os.listdir(tmp_path / "tb" / "t")) == 1
    assert (task / "checkpoint-best.ckpt").is_file()
    assert not [n for n in os.listdir(task) if ".partial-" in n]
    logs = worker_logs(tmp_path / "log_train")
    assert "Training time" in logs[0]
    assert "distributed init (rank 1/2)" in logs[1]

    # evaluate the saved best checkpoint: one process, msrun --dist_eval, msrun replicated eval
    best = str(task / "checkpoint-best.ckpt")
    eval_args = TINY_CLI + ["--data_path", str(data), "--eval", "--resume", best, "--log_dir", str(tmp_path / "tb2")]
    single = python([MAIN] + eval_args + ["--output_dir", str(tmp_path / "ev_single")], tmp_path)
    assert single.returncode == 0, _explain(single)
    _, ref = _read_csv(tmp_path / "ev_single" / "t" / "metrics_test.csv")

    for name, extra in (("ev_dist", ["--dist_eval"]), ("ev_repl", [])):
        proc = msrun([MAIN] + eval_args + extra + ["--output_dir", str(tmp_path / name)], tmp_path,
                     tmp_path / f"log_{name}")
        assert proc.returncode == 0, _explain(proc, tmp_path / f"log_{name}")
        _, got = _read_csv(tmp_path / name / "t" / "metrics_test.csv")
        assert len(got) == 1
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-6, err_msg=name)
    # the training run's final test (distributed, same best weights) agrees as well
    _, train_test = _read_csv(task / "metrics_test.csv")
    np.testing.assert_allclose(train_test[0], ref[0], rtol=0, atol=1e-6)
