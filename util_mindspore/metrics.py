# --------------------------------------------------------
# RETFound for MindSpore: evaluation metrics, metrics_{mode}.csv and result figures.
# Derived from: rmaphoh/RETFound engine_finetune.py `evaluate` (the ten scikit-learn numbers,
# the CSV layout, pycm's normalised confusion-matrix plot). Written anew; no torch, no pycm.
# --------------------------------------------------------
"""Metrics and figures for evaluation, computed on plain numpy arrays.

``compute_metrics`` reproduces the original's numbers exactly (same scikit-learn calls on the
same one-hot arrays). The one deliberate difference: when a class has no sample in the split,
ROC-AUC and average precision are macro-averaged over the classes where they are defined, with
a warning naming the others (the original either raises in old scikit-learn or returns NaN for
ROC-AUC and counts the class as AP 0 in scikit-learn >= 1.6).
"""
import csv
import os
import warnings

import numpy as np
from sklearn.metrics import (accuracy_score, average_precision_score, cohen_kappa_score, f1_score,
                             hamming_loss, jaccard_score, precision_score, recall_score, roc_auc_score,
                             roc_curve)

METRIC_NAMES = ('accuracy', 'f1', 'roc_auc', 'hamming', 'jaccard', 'precision', 'recall',
                'average_precision', 'kappa', 'score')
# The original's header (engine_finetune.py evaluate): no 'score' column.
CSV_HEADER = ['val_loss', 'accuracy', 'f1', 'roc_auc', 'hamming', 'jaccard', 'precision', 'recall',
              'average_precision', 'kappa']


class AbsentClassWarning(UserWarning):
    """A class has no sample in the evaluated split; per-class ranking metrics skip it."""


def _one_hot(labels, num_class):
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_class):
        raise ValueError(f'labels must lie in [0, {num_class - 1}] (num_class={num_class}); '
                         f'got min {labels.min()}, max {labels.max()}')
    out = np.zeros((labels.shape[0], num_class), dtype=np.int64)  # F.one_hot gives int64
    out[np.arange(labels.shape[0]), labels] = 1
    return out


def _ranking_metric(fn, y_true, y_score, columns, name, **kwargs):
    """Macro average of ``fn`` over ``columns`` (all columns: exactly the original's call)."""
    if len(columns) == y_true.shape[1]:
        return float(fn(y_true, y_score, average='macro', **kwargs))
    if not columns:
        warnings.warn(f'{name} is undefined for this split (no class has both positive and negative '
                      f'samples): reported as NaN', AbsentClassWarning, stacklevel=3)
        return float('nan')
    return float(fn(y_true[:, columns], y_score[:, columns], average='macro', **kwargs))


def compute_metrics(true_labels, pred_softmax, num_class):
    """The original's ten numbers from labels (N,) and softmax probabilities (N, num_class).

    Returns a dict with METRIC_NAMES as keys (floats) and ``absent_classes`` (list of class
    indices with no sample in ``true_labels``). pred label = argmax of the softmax (first index on
    ties, as torch.argmax); averages are macro; score = (f1 + roc_auc + kappa) / 3.
    """
    true_labels = np.asarray(true_labels, dtype=np.int64).reshape(-1)
    pred_softmax = np.asarray(pred_softmax)
    if pred_softmax.ndim != 2 or pred_softmax.shape != (true_labels.shape[0], num_class):
        raise ValueError(f'pred_softmax must have shape (N, num_class) = ({true_labels.shape[0]}, {num_class}); '
                         f'got {pred_softmax.shape}')
    if true_labels.shape[0] == 0:
        raise ValueError('no predictions to evaluate (empty split)')
    pred_labels = pred_softmax.argmax(axis=1)
    true_onehot = _one_hot(true_labels, num_class)
    pred_onehot = _one_hot(pred_labels, num_class)

    positives = true_onehot.sum(axis=0)
    absent = [int(c) for c in np.flatnonzero(positives == 0)]
    if absent:
        warnings.warn(f'classes {absent} have no sample in this split (of {num_class} classes): ROC-AUC and '
                      f'average precision are macro-averaged over the other classes only',
                      AbsentClassWarning, stacklevel=2)
    n = true_labels.shape[0]
    auc_columns = [c for c in range(num_class) if 0 < positives[c] < n]   # needs positives and negatives
    ap_columns = [c for c in range(num_class) if positives[c] > 0]        # needs positives

    m = {
        'accuracy': float(accuracy_score(true_labels, pred_labels)),
        'hamming': float(hamming_loss(true_onehot, pred_onehot)),
        'jaccard': float(jaccard_score(true_onehot, pred_onehot, average='macro')),
        'average_precision': _ranking_metric(average_precision_score, true_onehot, pred_softmax, ap_columns,
                                             'average precision'),
        'kappa': float(cohen_kappa_score(true_labels, pred_labels)),
        'f1': float(f1_score(true_onehot, pred_onehot, zero_division=0, average='macro')),
        'roc_auc': _ranking_metric(roc_auc_score, true_onehot, pred_softmax, auc_columns, 'ROC-AUC',
                                   multi_class='ovr'),
        'precision': float(precision_score(true_onehot, pred_onehot, zero_division=0, average='macro')),
        'recall': float(recall_score(true_onehot, pred_onehot, zero_division=0, average='macro')),
    }
    m['score'] = (m['f1'] + m['roc_auc'] + m['kappa']) / 3
    m['absent_classes'] = absent
    return m


def write_metrics_csv(path, val_loss, metrics):
    """Append one row to metrics_{mode}.csv; the header is written only when the file is new."""
    file_exists = os.path.isfile(path)
    with open(path, 'a', newline='', encoding='utf8') as f:
        w = csv.writer(f)
        if not file_exists:
            w.writerow(CSV_HEADER)
        w.writerow([float(val_loss)] + [float(metrics[k]) for k in CSV_HEADER[1:]])


def _figure(figsize):
    # A bare Figure with an Agg canvas: no pyplot global state, works without a display.
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _names(class_names, classes):
    if class_names is None:
        return [str(c) for c in classes]
    return [str(class_names[c]) for c in classes]


def save_confusion_matrix(true_labels, pred_labels, path, class_names=None, dpi=600):
    """Row-normalised confusion matrix with the values in the cells, Blues colormap.

    Like pycm's ``plot(cmap=Blues, number_label=True, normalized=True)`` in the original: rows are
    actual classes, each row divided by its total (an empty row stays 0). Classes: all of
    ``class_names`` when given, else the labels that occur in either vector (as pycm).
    """
    true_labels = np.asarray(true_labels, dtype=np.int64).reshape(-1)
    pred_labels = np.asarray(pred_labels, dtype=np.int64).reshape(-1)
    if class_names is not None:
        classes = list(range(len(class_names)))
    else:
        classes = sorted(set(true_labels.tolist()) | set(pred_labels.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    counts = np.zeros((k, k), dtype=np.float64)
    for t, p in zip(true_labels, pred_labels):
        counts[index[int(t)], index[int(p)]] += 1
    totals = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    names = _names(class_names, classes)
    side = max(4.0, 0.6 * k + 2.0)
    fig = _figure((side, side))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, interpolation='nearest', cmap='Blues', vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax)
    ax.set_title('Confusion Matrix (Normalized)')
    ax.set_xticks(range(k), names, rotation=45, ha='right')
    ax.set_yticks(range(k), names)
    ax.set_xlabel('Predicted Classes')
    ax.set_ylabel('Actual Classes')
    threshold = norm.max() / 2.0 if k else 0.0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f'{norm[i, j]:.2f}', ha='center', va='center',
                    color='white' if norm[i, j] > threshold else 'black')
    fig.savefig(path, dpi=dpi, bbox_inches='tight')
    return norm


def save_roc_curves(true_labels, pred_softmax, path, class_names=None, dpi=150):
    """One-vs-rest ROC curve per class (AUC in the legend); classes absent from the split are
    listed in the legend as skipped."""
    true_labels = np.asarray(true_labels, dtype=np.int64).reshape(-1)
    pred_softmax = np.asarray(pred_softmax, dtype=np.float64)
    num_class = pred_softmax.shape[1]
    names = _names(class_names, range(num_class))
    fig = _figure((6, 6))
    ax = fig.add_subplot(1, 1, 1)
    for c in range(num_class):
        y = (true_labels == c).astype(np.int64)
        if 0 < y.sum() < y.size:
            fpr, tpr, _ = roc_curve(y, pred_softmax[:, c])
            auc = float(np.trapezoid(tpr, fpr)) if hasattr(np, 'trapezoid') else float(np.trapz(tpr, fpr))
            ax.plot(fpr, tpr, label=f'{names[c]} (AUC {auc:.3f})')
        else:
            why = 'no sample' if y.sum() == 0 else 'no negative sample'
            ax.plot([], [], ' ', label=f'{names[c]}: skipped ({why} in split)')
    ax.plot([0, 1], [0, 1], linestyle='--', color='grey', linewidth=0.8)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel('False positive rate')
    ax.set_ylabel('True positive rate')
    ax.set_title('ROC curves (one vs rest)')
    ax.legend(loc='lower right', fontsize='small')
    fig.savefig(path, dpi=dpi, bbox_inches='tight')


def save_training_curves(log_rows, path, dpi=120):
    """Train loss (and val loss), learning rate and val score per epoch from log.txt rows
    (dicts with 'epoch', 'train_loss', 'train_lr', 'val_loss', 'val_score'; missing keys are skipped)."""
    rows = [r for r in log_rows if 'epoch' in r]
    epochs = [r['epoch'] for r in rows]

    def series(key):
        pts = [(r['epoch'], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = _figure((12, 3.6))
    panels = [('Loss', [('train_loss', 'train'), ('val_loss', 'val')]),
              ('Learning rate', [('train_lr', 'lr (max group)')]),
              ('Validation score', [('val_score', '(F1 + ROC-AUC + kappa) / 3')])]
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for key, label in keys:
            x, y = series(key)
            if x:
                ax.plot(x, y, marker='o', markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel('epoch')
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
