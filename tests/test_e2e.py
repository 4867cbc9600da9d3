"""End to end: main_finetune_mindspore.py on a tiny generated dataset with a small ViT.

Real subprocesses, real MindSpore datasets and checkpoints. Covers: the original's output files and
columns; --eval --resume reproduces the test numbers; SIGKILL mid-run then --resume finishes with the
same epoch numbering and per-step LR values as an uninterrupted run; every bad input of the issue."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main_finetune_mindspore.py")
COMMON = ["--model", "vit_tiny_patch16", "--input_size", "32", "--nb_classes", "3", "--batch_size", "8",
          "--warmup_epochs", "1", "--drop_path", "0", "--num_workers", "1", "--device", "CPU", "--blr", "1e-2"]
CSV_HEADER = ['val_loss', 'accuracy', 'f1', 'roc_auc', 'hamming', 'jaccard', 'precision', 'recall',
              'average_precision', 'kappa']


def read_jsonl(path):
    """The records of a log.txt (one JSON object per line)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _run(args, cwd, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, MAIN] + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_demo_data.py"), "--out", str(root / "data"),
                    "--train", "8", "--val", "4", "--test", "4", "--size", "40"], check=True,
                   capture_output=True)
    return root


@pytest.fixture(scope="module")
def trained(data):
    """An uninterrupted 3-epoch run (the reference for the resume test too)."""
    out = data / "out"
    r = _run(COMMON + ["--data_path", str(data / "data"), "--task", "full", "--epochs", "3",
                       "--output_dir", str(out), "--log_dir", str(data / "logs")], cwd=str(data))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return data, out / "full", r.stdout


def test_outputs_have_the_original_names_and_columns(trained):
    _, task, stdout = trained
    for name in ["checkpoint-best.ckpt", "checkpoint-latest.ckpt", "log.txt", "metrics_val.csv",
                 "metrics_test.csv", "confusion_matrix_test.jpg", "roc_curves_test.png", "training_curves.png"]:
        assert (task / name).is_file() and (task / name).stat().st_size > 0, name
    val, test = _rows(task / "metrics_val.csv"), _rows(task / "metrics_test.csv")
    assert val[0] == CSV_HEADER and test[0] == CSV_HEADER
    assert len(val) == 1 + 3 and len(test) == 1 + 1
    log = read_jsonl(task / "log.txt")
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert {"train_lr", "train_loss", "epoch", "n_parameters"} <= set(log[0])
    assert "Test with the best model, epoch = " in stdout
    assert "Epoch: [2]" in stdout and "eta:" in stdout  # MetricLogger lines as the original


def test_eval_resume_reproduces_test_metrics(trained):
    data, task, _ = trained
    out = data / "out_eval"
    r = _run(COMMON + ["--data_path", str(data / "data"), "--task", "ev", "--eval", "--output_dir", str(out),
                       "--resume", str(task / "checkpoint-best.ckpt")], cwd=str(data))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = np.array(_rows(task / "metrics_test.csv")[1], dtype=np.float64)
    got = np.array(_rows(out / "ev" / "metrics_test.csv")[1], dtype=np.float64)
    assert np.allclose(got, ref, rtol=0, atol=1e-6), (got, ref)
    # our latest checkpoint (with optimizer state) is accepted for evaluation too
    r = _run(COMMON + ["--data_path", str(data / "data"), "--task", "ev2", "--eval", "--output_dir", str(out),
                       "--resume", str(task / "checkpoint-latest.ckpt")], cwd=str(data))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _lr_by_step(log_dir):
    from util_mindspore.tb_writer import read_scalars
    scalars = read_scalars(str(log_dir))
    return {int(step): float(v) for step, v in scalars["lr"]}


def test_sigkill_then_resume_matches_uninterrupted_run(trained):
    data, ref_task, _ = trained
    out, logs = data / "out_kill", data / "logs_kill"
    task = out / "kill"
    args = COMMON + ["--data_path", str(data / "data"), "--task", "kill", "--epochs", "3", "--output_dir", str(out),
                     "--log_dir", str(logs)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, MAIN] + args, cwd=str(data), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    try:
        while not (task / "checkpoint-latest.ckpt").exists():  # epoch 0 finished and saved
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "epoch 0 did not finish in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # somewhere in epoch 1 (or while saving it)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    r = _run(["--resume", str(task / "checkpoint-latest.ckpt")], cwd=str(data))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Start training for 3 epochs" in r.stdout

    log = read_jsonl(task / "log.txt")
    assert [row["epoch"] for row in log] == [0, 1, 2]  # no completed epoch lost, none repeated
    assert len(_rows(task / "metrics_val.csv")) == 1 + 3
    assert len(_rows(task / "metrics_test.csv")) == 1 + 1

    ref_lr, lr = _lr_by_step(data / "logs" / "full"), _lr_by_step(logs / "kill")
    resumed_steps = [s for s in ref_lr if s >= 1000 * (min(r2["epoch"] for r2 in log[1:]))]
    assert resumed_steps and all(s in lr for s in resumed_steps)
    assert max(abs(lr[s] - ref_lr[s]) for s in resumed_steps) <= 1e-12
    # the data order, augmentation draws and arithmetic are deterministic: the epochs match the
    # uninterrupted run (train loss from log.txt, val metrics from the csv)
    ref_log = read_jsonl(ref_task / "log.txt")
    assert np.allclose([r2["train_loss"] for r2 in log], [r2["train_loss"] for r2 in ref_log], rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors before any compile, nothing written or lost (in-process: fast)
# ---------------------------------------------------------------------------------------------
def _main_exit(argv, capsys=None):
    import main_finetune_mindspore as mf
    parser = mf.get_args_parser()
    args = parser.parse_args(argv)
    with pytest.raises(SystemExit) as e:
        mf.main(args)
    return str(e.value)


def _make_tree(root, splits=("train", "val", "test"), classes=("a", "b"), n=2, size=16, skip=()):
    from PIL import Image
    for s in splits:
        for c in classes:
            d = root / s / c
            d.mkdir(parents=True, exist_ok=True)
            if (s, c) in skip:
                continue
            for i in range(n):
                Image.new("RGB", (size, size), (i * 40, 10, 10)).save(d / f"{i}.png")
    return root


def _bad(tmp_path, data_path, **over):
    argv = ["--model", "vit_tiny_patch16", "--input_size", "32", "--nb_classes", str(over.get("nb", 2)),
            "--batch_size", str(over.get("bs", 2)), "--num_workers", "1", "--device", "CPU",
            "--data_path", str(data_path), "--output_dir", str(over.get("out", tmp_path / "out")),
            "--task", "t"] + over.get("extra", [])
    return _main_exit(argv)


def test_missing_split(tmp_path):
    root = _make_tree(tmp_path / "d", splits=("train", "val"))
    msg = _bad(tmp_path, root)
    assert "test" in msg and "Data error" in msg


def test_class_folders_differ_between_splits(tmp_path):
    root = _make_tree(tmp_path / "d")
    _make_tree(root, splits=("train",), classes=("c",))
    msg = _bad(tmp_path, root, nb=3)
    assert "val/ has classes [a, b] but train/ has [a, b, c]" in msg


def test_nb_classes_mismatch(tmp_path):
    root = _make_tree(tmp_path / "d")
    msg = _bad(tmp_path, root, nb=5)
    assert "nb_classes" in msg and "2" in msg


def test_empty_class(tmp_path):
    root = _make_tree(tmp_path / "d", skip={("train", "b")})
    msg = _bad(tmp_path, root)
    assert "b" in msg and ("no images" in msg or "empty" in msg)


def test_corrupt_image_listed_before_training(tmp_path):
    root = _make_tree(tmp_path / "d")
    (root / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "val" / "b" / "empty.png").write_bytes(b"")
    msg = _bad(tmp_path, root)
    assert "broken.jpg" in msg and "empty.png" in msg and "--skip_bad_images" in msg


def test_batch_larger_than_training_set(tmp_path):
    root = _make_tree(tmp_path / "d")
    msg = _bad(tmp_path, root, bs=64)
    assert "larger than the training set" in msg and "zero steps" in msg


def test_output_dir_not_writable(tmp_path):
    root = _make_tree(tmp_path / "d")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    msg = _bad(tmp_path, root, out=blocker / "sub")
    assert "not writable" in msg


def test_resume_missing_and_foreign(tmp_path, trained):
    root = _make_tree(tmp_path / "d", classes=("a", "b", "c"))
    msg = _bad(tmp_path, root, nb=3, extra=["--eval", "--resume", str(tmp_path / "nope.ckpt")])
    assert "nope.ckpt" in msg
    _, task, _ = trained
    argv = ["--model", "vit_small_patch16", "--input_size", "32", "--nb_classes", "3", "--batch_size", "2",
            "--num_workers", "1", "--device", "CPU", "--data_path", str(root), "--output_dir", str(tmp_path / "o"),
            "--task", "t", "--eval", "--resume", str(task / "checkpoint-best.ckpt")]
    msg = _main_exit(argv)
    assert "--resume" in msg and "shape" in msg


@pytest.mark.torch
def test_eval_of_a_checkpoint_fine_tuned_by_the_original(data, tmp_path):
    """--eval --resume checkpoint-best.pth as the original saves it (model, epoch, pickled args):
    the test metrics equal the torch model's own predictions on the same images."""
    import argparse
    import torch
    from tests.original_reference import retfound_vit, randomize_
    from util_mindspore.datasets import build_dataset
    from util_mindspore.metrics import compute_metrics
    tm = randomize_(retfound_vit(global_pool=True, img_size=32, patch_size=16, embed_dim=192, depth=12,
                                 num_heads=3, num_classes=3), seed=11).eval()
    pth = tmp_path / "checkpoint-best.pth"
    torch.save({"model": tm.state_dict(), "epoch": 7,
                "args": argparse.Namespace(model="vit_large_patch16", nb_classes=3)}, pth)
    out = tmp_path / "out"
    r = _run(COMMON + ["--data_path", str(data / "data"), "--task", "orig", "--eval", "--output_dir", str(out),
                       "--resume", str(pth)], cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Test with the best model at epoch = 7" in r.stdout
    got = dict(zip(CSV_HEADER, map(float, _rows(out / "orig" / "metrics_test.csv")[1])))

    ds = build_dataset("test", SimpleArgs(data_path=str(data / "data"), input_size=32))
    images = np.stack([ds[i][0] for i in range(len(ds))])
    labels = np.array([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        logits = tm(torch.from_numpy(images))
        probs = torch.softmax(logits, dim=1).numpy()
        losses = [torch.nn.functional.cross_entropy(logits[i:i + 8], torch.from_numpy(labels[i:i + 8])).item()
                  for i in range(0, len(labels), 8)]
    ref = compute_metrics(labels, probs, 3)
    for k in CSV_HEADER[1:]:
        assert abs(got[k] - ref[k]) <= 1e-6, k
    assert abs(got["val_loss"] - float(np.mean(losses))) <= 1e-5


def _original_args(**kw):
    """The argparse.Namespace the original pickles into its checkpoints: its flags (ours without the
    [MindSpore] additions, same names and defaults) as main_finetune.py leaves them, device 'cuda'."""
    import argparse
    sys.path.insert(0, ROOT)
    try:
        from main_finetune_mindspore import get_args_parser
    finally:
        sys.path.remove(ROOT)
    ns = vars(get_args_parser().parse_args([]))
    for ours in ("device", "mode", "amp_level", "cpu_bf16", "weights_cache_dir", "single_fc_norm",
                 "skip_bad_images"):
        ns.pop(ours)
    ns.update(device="cuda", distributed=False)
    ns.update(kw)
    return argparse.Namespace(**ns)


@pytest.mark.torch
@pytest.mark.parametrize("with_optimizer", [False, True], ids=["best_pth", "pth_with_torch_optimizer"])
def test_training_resume_from_a_checkpoint_of_the_original(data, tmp_path, with_optimizer):
    """--resume checkpoint-best.pth without --eval, as the original allows: the run takes the
    checkpoint's args (all but the torch device) and its weights, and trains from args.start_epoch
    (the original's best checkpoint has no optimizer state); a .pth with a torch optimizer state
    continues at epoch + 1, with fresh AdamW moments (warned). With lr 0 the weights the run saves
    must be the .pth's, bit for bit."""
    import torch
    from tests.original_reference import retfound_vit, randomize_
    from util_mindspore.checkpoint import load_checkpoint_checked
    tm = randomize_(retfound_vit(global_pool=True, img_size=32, patch_size=16, embed_dim=192, depth=12,
                                 num_heads=3, num_classes=3), seed=5)
    out = tmp_path / "out"
    saved = _original_args(model="vit_tiny_patch16", input_size=32, nb_classes=3, batch_size=8, epochs=2,
                           warmup_epochs=1, drop_path=0.0, num_workers=1, lr=0.0, min_lr=0.0,
                           data_path=str(data / "data"), output_dir=str(out), log_dir=str(tmp_path / "logs"),
                           task="resumed")
    ckpt = {"model": tm.state_dict(), "epoch": 0, "args": saved}
    if with_optimizer:
        opt = torch.optim.AdamW(tm.parameters(), lr=1e-3)
        tm(torch.zeros(1, 3, 32, 32)).sum().backward()
        opt.step()
        ckpt["model"] = tm.state_dict()
        ckpt["optimizer"] = opt.state_dict()
    pth = tmp_path / "checkpoint-best.pth"
    torch.save(ckpt, pth)
    r = _run(["--resume", str(pth), "--device", "CPU"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Load checkpoint (args) from" in r.stdout
    epochs = [rec["epoch"] for rec in read_jsonl(out / "resumed" / "log.txt")]
    if with_optimizer:
        assert "AdamW's moments start from zero" in r.stdout
        assert epochs == [1]  # continues after the checkpoint's epoch 0, as the original
    else:
        assert "no optimizer state" in r.stdout
        assert epochs == [0, 1]  # the original's args.start_epoch
    best = load_checkpoint_checked(out / "resumed" / "checkpoint-best.ckpt")
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    assert set(sd) <= set(best)
    for k, v in sd.items():
        assert np.array_equal(best[k].asnumpy(), v), k


class SimpleArgs:
    def __init__(self, **kw):
        defaults = dict(aa="rand-m9-mstd0.5-inc1", color_jitter=None, reprob=0.25, remode="pixel", recount=1,
                        resplit=False, dataratio="1.0", stratified=False, seed=0)
        defaults.update(kw)
        self.__dict__.update(defaults)


def test_an_image_that_fails_when_loaded_stops_the_run_naming_it(tmp_path):
    """An image that passes the pre-flight check (a PNG with damaged data, CRCs recomputed) and
    fails when a loader worker decodes it: the run exits 1 with the file's name, not a bare
    MindSpore pipeline trace."""
    from tests.test_datasets import _png_with_damaged_data
    root = _make_tree(tmp_path / "d")
    bad = _png_with_damaged_data(str(root / "train" / "b" / "9.png"), size=16)
    r = _run(["--model", "vit_tiny_patch16", "--input_size", "32", "--nb_classes", "2", "--batch_size", "2",
              "--num_workers", "2", "--device", "CPU", "--data_path", str(root), "--epochs", "1",
              "--output_dir", str(tmp_path / "out"), "--task", "t"], cwd=str(tmp_path))
    assert r.returncode == 1
    last = (r.stdout + r.stderr).strip().splitlines()[-1]
    assert last.startswith(f"Data error: unreadable image {bad}: OSError"), last


def _rewrite_checkpoint(path, **changes):
    """Rewrite a checkpoint of ours with changed scalar entries (args=... updates the args JSON)."""
    from util_mindspore.checkpoint import save_checkpoint_atomic, load_checkpoint_checked
    ckpt = load_checkpoint_checked(path)
    meta = {k: (v if isinstance(v, str) else v.asnumpy().item()) for k, v in ckpt.items()
            if isinstance(v, str) or len(v.shape) == 0}
    tensors = [{"name": k, "data": v} for k, v in ckpt.items() if k not in meta]
    if "args" in changes:
        meta["args"] = json.dumps(dict(json.loads(meta["args"]), **changes.pop("args")))
    meta.update(changes)
    save_checkpoint_atomic(tensors, str(path), append_dict=meta)


def test_resume_on_another_device_keeps_the_command_line_device(trained, tmp_path):
    """A checkpoint's args replace the command line's on --resume (as the original), except an
    explicit --device: a run saved on GPU can be resumed on CPU (its error used to advise passing
    --device CPU, which was then overwritten)."""
    import shutil
    data, task, _ = trained
    moved = tmp_path / "checkpoint-latest.ckpt"
    shutil.copy(task / "checkpoint-latest.ckpt", moved)
    _rewrite_checkpoint(moved, args={"device": "GPU", "output_dir": str(tmp_path / "out")})
    r = _run(["--resume", str(moved), "--device", "CPU"], cwd=str(data))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "device='CPU'" in r.stdout


def test_resume_keeps_a_best_checkpoint_saved_after_the_latest_one(data, tmp_path):
    """Killed after checkpoint-best of epoch E and before checkpoint-latest of E: the resumed run
    redoes E with the previous best score in checkpoint-latest, but checkpoint-best already holds
    E's weights. The best must stay that file's epoch and score (unless beaten), so that the
    reported best epoch is the one the final test loads."""
    out = tmp_path / "out"
    args = COMMON + ["--data_path", str(data / "data"), "--task", "t", "--output_dir", str(out),
                     "--log_dir", str(tmp_path / "logs")]
    r = _run(args + ["--epochs", "1"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    task = out / "t"
    # what a killed 2-epoch run leaves: checkpoint-latest of epoch 0, and checkpoint-best of epoch 1
    # (with a score that no re-run reaches)
    _rewrite_checkpoint(task / "checkpoint-latest.ckpt", args={"epochs": 2})
    _rewrite_checkpoint(task / "checkpoint-best.ckpt", epoch=1, max_score=99.0)
    r = _run(["--resume", str(task / "checkpoint-latest.ckpt")], cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "checkpoint-best.ckpt holds epoch 1 (score 99.0000)" in r.stdout
    assert "Best epoch = 1, Best score = 99.0000" in r.stdout
    assert "Test with the best model, epoch = 1:" in r.stdout
    assert [row["epoch"] for row in read_jsonl(task / "log.txt")] == [0, 1]


def test_training_resume_from_a_missing_or_corrupt_checkpoint(tmp_path):
    root = _make_tree(tmp_path / "d")
    msg = _bad(tmp_path, root, extra=["--resume", str(tmp_path / "gone" / "checkpoint-latest.ckpt")])
    assert msg.startswith("--resume:") and "not found" in msg
    bad = tmp_path / "checkpoint-latest.ckpt"
    bad.write_bytes(b"half a checkpoint")
    msg = _bad(tmp_path, root, extra=["--resume", str(bad)])
    assert msg.startswith("--resume:") and "truncated" in msg


@pytest.mark.parametrize("flag,value,expect", [("--remode", "gaussian", "--remode must be 'pixel', 'rand' or 'const'"),
                                                ("--aa", "v0", "only RandAugment")])
def test_bad_augmentation_flags_fail_before_the_model_is_built(tmp_path, flag, value, expect):
    """As timm's constructors assert at build_dataset time, not at the first training image."""
    root = _make_tree(tmp_path / "d")
    msg = _bad(tmp_path, root, extra=[flag, value])
    assert msg.startswith("Augmentation settings:") and expect in msg


def test_dinov2_needs_a_dinov2_model_arch(tmp_path):
    root = _make_tree(tmp_path / "d")
    msg = _main_exit(["--model", "Dinov2", "--input_size", "224", "--nb_classes", "2", "--device", "CPU",
                      "--batch_size", "2", "--num_workers", "1", "--data_path", str(root),
                      "--output_dir", str(tmp_path / "o")])
    assert "dinov3_vits16" in msg and "dinov2_vitl14" in msg


def test_unavailable_device_is_a_clear_error(tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import mindspore as ms; ms.set_device('GPU')"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode == 0:
        pytest.skip("this MindSpore build can use a GPU")
    root = _make_tree(tmp_path / "d")
    msg = _main_exit(["--device", "GPU", "--data_path", str(root), "--nb_classes", "2",
                      "--output_dir", str(tmp_path / "o")])
    assert msg.startswith("--device GPU:") and "--device CPU" in msg


def test_cpu_bf16_trains_and_evaluates(data, tmp_path):
    """--cpu_bf16: a real run with bf16 GEMMs in the Linear layers writes the usual outputs, and its
    checkpoint (fp32 master weights) evaluates in the default fp32 mode."""
    from util_mindspore import cpu_kernels
    if not cpu_kernels.linear_available(bf16=True):
        pytest.skip(cpu_kernels.status())
    out = tmp_path / "out"
    r = _run(COMMON + ["--data_path", str(data / "data"), "--task", "bf16", "--epochs", "1", "--cpu_bf16",
                       "--output_dir", str(out)], cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Linear GEMMs: oneDNN fp32+bf16, bf16 inputs, fp32 accumulation" in r.stdout
    assert "evaluation: bf16 weights packed once (oneDNN matmul)" in r.stdout  # the epoch's evaluate()
    log = read_jsonl(out / "bf16" / "log.txt")
    assert np.isfinite(log[0]["train_loss"])
    r2 = _run(COMMON + ["--data_path", str(data / "data"), "--task", "bf16_eval", "--eval", "--output_dir",
                        str(out), "--resume", str(out / "bf16" / "checkpoint-best.ckpt")], cwd=str(tmp_path))
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "Linear GEMMs: oneDNN fp32+bf16, fp32" in r2.stdout
    assert _rows(out / "bf16_eval" / "metrics_test.csv")[0] == CSV_HEADER


def test_eval_with_weights_packed_in_place_writes_the_same_metrics(trained, tmp_path, monkeypatch):
    """--eval over 4 batches (--batch_size 1, 4 test images): the fp32 Linear weights are packed in
    place for the evaluation (the status line says so); the metrics equal those of the same run with
    RETFOUND_PACK_IN_PLACE=0 (dnnl_sgemm) to 1e-6."""
    from util_mindspore import cpu_kernels
    if not cpu_kernels.linear_available() or not cpu_kernels._lib().RfPackedMatmulAvailable():
        pytest.skip(cpu_kernels.status())
    data, task, _ = trained
    args = COMMON + ["--data_path", str(data / "data"), "--eval", "--output_dir", str(tmp_path),
                     "--resume", str(task / "checkpoint-best.ckpt")]
    args[args.index("--batch_size") + 1] = "1"
    r = _run(args + ["--task", "packed"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "fp32 weights packed in place (oneDNN matmul)" in r.stdout
    monkeypatch.setenv(cpu_kernels.ENV_PACK, "0")
    r2 = _run(args + ["--task", "plain"], cwd=str(tmp_path))
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert f"evaluation: dnnl_sgemm ({cpu_kernels.ENV_PACK}=0)" in r2.stdout
    packed = np.array(_rows(tmp_path / "packed" / "metrics_test.csv")[1], dtype=np.float64)
    plain = np.array(_rows(tmp_path / "plain" / "metrics_test.csv")[1], dtype=np.float64)
    assert np.allclose(packed, plain, rtol=0, atol=1e-6), (packed, plain)


def test_cpu_bf16_with_amp_level_is_a_clear_error(tmp_path):
    root = _make_tree(tmp_path / "d")
    msg = _main_exit(["--cpu_bf16", "--amp_level", "O2", "--device", "CPU", "--data_path", str(root),
                      "--nb_classes", "2", "--output_dir", str(tmp_path / "o")])
    assert msg.startswith("--cpu_bf16 cannot be combined with --amp_level")
