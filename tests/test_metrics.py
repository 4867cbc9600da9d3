# --------------------------------------------------------
# Tests for util_mindspore/metrics.py: the ten numbers against the original evaluate's code path
# (rmaphoh/RETFound engine_finetune.py: torch F.one_hot + the same scikit-learn calls), the CSV,
# and the figures.
# --------------------------------------------------------
import csv
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from util_mindspore.metrics import (CSV_HEADER, METRIC_NAMES, AbsentClassWarning, compute_metrics,
                                    save_confusion_matrix, save_roc_curves, save_training_curves,
                                    write_metrics_csv)


def _predictions(n, num_class, seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_class)  # every class present
    logits = rng.normal(size=(n, num_class)).astype(np.float32)
    logits[np.arange(n), labels] += rng.uniform(0, 2, size=n).astype(np.float32)  # better than chance
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return labels, (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _original_metrics(labels, softmax, num_class, batch_size=8):
    """engine_finetune.py evaluate, minus the model: per-batch F.one_hot/argmax, list.extend, sklearn."""
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import (accuracy_score, average_precision_score, cohen_kappa_score, f1_score,
                                 hamming_loss, jaccard_score, precision_score, recall_score)
    true_onehot, pred_onehot, true_labels, pred_labels, pred_softmax = [], [], [], [], []
    for s in range(0, len(labels), batch_size):
        target = torch.from_numpy(labels[s:s + batch_size])
        output_ = torch.from_numpy(softmax[s:s + batch_size])
        target_onehot = F.one_hot(target.to(torch.int64), num_classes=num_class)
        output_label = output_.argmax(dim=1)
        output_onehot = F.one_hot(output_label.to(torch.int64), num_classes=num_class)
        true_onehot.extend(target_onehot.cpu().numpy())
        pred_onehot.extend(output_onehot.detach().cpu().numpy())
        true_labels.extend(target.cpu().numpy())
        pred_labels.extend(output_label.detach().cpu().numpy())
        pred_softmax.extend(output_.detach().cpu().numpy())
    accuracy = accuracy_score(true_labels, pred_labels)
    hamming = hamming_loss(true_onehot, pred_onehot)
    jaccard = jaccard_score(true_onehot, pred_onehot, average='macro')
    average_precision = average_precision_score(true_onehot, pred_softmax, average='macro')
    kappa = cohen_kappa_score(true_labels, pred_labels)
    f1 = f1_score(true_onehot, pred_onehot, zero_division=0, average='macro')
    roc_auc = roc_auc_score(true_onehot, pred_softmax, multi_class='ovr', average='macro')
    precision = precision_score(true_onehot, pred_onehot, zero_division=0, average='macro')
    recall = recall_score(true_onehot, pred_onehot, zero_division=0, average='macro')
    score = (f1 + roc_auc + kappa) / 3
    return dict(accuracy=accuracy, f1=f1, roc_auc=roc_auc, hamming=hamming, jaccard=jaccard, precision=precision,
                recall=recall, average_precision=average_precision, kappa=kappa, score=score)


@pytest.mark.torch
@pytest.mark.parametrize('num_class,n,seed', [(2, 30, 0), (3, 37, 1), (5, 50, 2), (8, 61, 3)])
def test_metrics_equal_original_evaluate(num_class, n, seed):
    labels, softmax = _predictions(n, num_class, seed)
    ref = _original_metrics(labels, softmax, num_class)
    with warnings.catch_warnings():
        warnings.simplefilter('error', AbsentClassWarning)
        ours = compute_metrics(labels, softmax, num_class)
    assert ours['absent_classes'] == []
    for k in METRIC_NAMES:
        assert ours[k] == ref[k], (k, ours[k], ref[k])  # exact: the same sklearn calls on the same arrays


@pytest.mark.torch
def test_metrics_tie_breaking_equals_torch_argmax():
    labels = np.array([0, 1, 2, 0, 1, 2])
    softmax = np.full((6, 3), 1 / 3, dtype=np.float32)  # all ties: torch and numpy take the first index
    softmax[1] = [0.2, 0.4, 0.4]
    ref = _original_metrics(labels, softmax, 3)
    ours = compute_metrics(labels, softmax, 3)
    for k in METRIC_NAMES:
        assert ours[k] == ref[k], k


def test_absent_class_warns_and_averages_over_present_classes():
    labels, softmax = _predictions(40, 4, 7)
    keep = labels != 2
    labels, softmax = labels[keep], softmax[keep]
    with pytest.warns(AbsentClassWarning, match=r'classes \[2\]'):
        m = compute_metrics(labels, softmax, 4)
    assert m['absent_classes'] == [2]
    onehot = np.eye(4, dtype=np.int64)[labels]
    cols = [0, 1, 3]
    assert m['roc_auc'] == roc_auc_score(onehot[:, cols], softmax[:, cols], average='macro')
    assert np.isfinite(m['roc_auc']) and np.isfinite(m['average_precision']) and np.isfinite(m['score'])


def test_single_class_split_gives_nan_roc_auc_without_crashing():
    labels = np.zeros(6, dtype=np.int64)
    softmax = np.tile(np.array([[0.7, 0.2, 0.1]], np.float32), (6, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        m = compute_metrics(labels, softmax, 3)
    assert any(issubclass(w.category, AbsentClassWarning) for w in caught)
    assert np.isnan(m['roc_auc']) and np.isnan(m['score'])
    assert m['accuracy'] == 1.0 and m['average_precision'] == 1.0


def test_bad_shapes_and_labels_are_reported():
    with pytest.raises(ValueError, match='shape'):
        compute_metrics([0, 1], np.ones((2, 3)), 2)
    with pytest.raises(ValueError, match='labels must lie'):
        compute_metrics([0, 3], np.ones((2, 3)) / 3, 3)


def test_metrics_csv_header_once_and_rows(tmp_path):
    path = tmp_path / 'metrics_val.csv'
    labels, softmax = _predictions(20, 3, 0)
    m = compute_metrics(labels, softmax, 3)
    write_metrics_csv(str(path), 0.5, m)
    write_metrics_csv(str(path), 0.25, m)
    with open(path, newline='', encoding='utf8') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['val_loss', 'accuracy', 'f1', 'roc_auc', 'hamming', 'jaccard', 'precision', 'recall',
                       'average_precision', 'kappa']
    assert rows[0] == CSV_HEADER and len(rows) == 3
    assert float(rows[1][0]) == 0.5 and float(rows[2][0]) == 0.25
    assert [float(x) for x in rows[1][1:]] == [m[k] for k in CSV_HEADER[1:]]


def _image(path, fmt):
    with Image.open(path) as im:
        assert im.format == fmt
        im.load()
        assert im.size[0] > 50 and im.size[1] > 50
        return np.asarray(im.convert('RGB'))


def test_confusion_matrix_jpeg_normalised(tmp_path):
    true = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 1, 0])
    path = tmp_path / 'confusion_matrix_test.jpg'
    norm = save_confusion_matrix(true, pred, str(path), class_names=['a', 'b', 'c', 'd'], dpi=80)
    np.testing.assert_allclose(norm, [[2 / 3, 1 / 3, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    pixels = _image(path, 'JPEG')
    assert pixels.std() > 10  # not a blank image
    # without names: the labels that occur (as pycm)
    norm = save_confusion_matrix(true, pred, str(tmp_path / 'cm2.jpg'), dpi=50)
    assert norm.shape == (3, 3)


def test_roc_and_training_curves_png(tmp_path):
    labels, softmax = _predictions(30, 3, 4)
    keep = labels != 1
    save_roc_curves(labels[keep], softmax[keep], str(tmp_path / 'roc.png'), class_names=['x', 'y', 'z'], dpi=60)
    _image(tmp_path / 'roc.png', 'PNG')
    rows = [{'epoch': e, 'train_loss': 1.0 / (e + 1), 'train_lr': 1e-3 * (e + 1), 'val_loss': 1.1 / (e + 1),
             'val_score': 0.5 + 0.1 * e} for e in range(3)]
    save_training_curves(rows, str(tmp_path / 'curves.png'), dpi=60)
    _image(tmp_path / 'curves.png', 'PNG')
