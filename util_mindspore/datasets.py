# Derived from: rmaphoh/RETFound util/datasets.py (build_dataset, _stratified_indices) and
# main_finetune.py (DistributedSampler/DataLoader wiring), torchvision datasets/folder.py (ImageFolder
# semantics) and torch's CPU randperm / DistributedSampler behaviour; written anew (numpy, PIL,
# mindspore.dataset; no torch).
"""ImageFolder dataset, torch-identical subsampling, layout/image checks and the MindSpore loader."""
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from .transforms import build_transform

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively like torchvision.
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class DatasetError(ValueError):
    """A data layout or image problem the user must fix before training."""


def pil_loader(path):
    """torchvision's pil_loader: open, then ``.convert('RGB')`` (no EXIF orientation applied).

    An image that decodes to RGB is returned as decoded: ``convert('RGB')`` would only copy it
    (same pixels, ~0.4 ms for 1024x1024)."""
    with open(path, 'rb') as f:
        img = Image.open(f)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f'unreadable image {path}: {type(e).__name__}: {e}. Remove or replace the file; '
                               f'checkpoints already written are kept (--resume continues from the latest)') from e
        return img if img.mode == 'RGB' else img.convert('RGB')


def is_image_file(name):
    return name.lower().endswith(IMG_EXTENSIONS)


def find_classes(root):
    """Sorted class folders (Python ``sorted``, like torchvision); hidden folders are skipped."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))


def make_samples(root, class_to_idx):
    """(path, label) in torchvision order: class by class, ``sorted(os.walk(...))``, sorted names.

    Unlike torchvision, hidden files/folders (``.DS_Store``, ``._x.jpg``, ``.ipynb_checkpoints``)
    are skipped."""
    samples = []
    for cls in sorted(class_to_idx, key=class_to_idx.get):
        walked = []
        for dirpath, dirnames, fnames in os.walk(os.path.join(root, cls), followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith('.')]
            walked.append((dirpath, dirnames, fnames))
        for dirpath, _, fnames in sorted(walked):
            for fname in sorted(fnames):
                if not fname.startswith('.') and is_image_file(fname):
                    samples.append((os.path.join(dirpath, fname), class_to_idx[cls]))
    return samples


class ImageFolder:
    """torchvision.datasets.ImageFolder look-alike. ``transform(img, rng)`` receives a generator
    (ignored by the eval transform); ``__getitem__(i)`` uses ``rng=None`` -> a fresh default_rng(i)."""

    def __init__(self, root, transform=None, classes=None):
        self.root = root
        self.classes = list(classes) if classes is not None else find_classes(root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = make_samples(root, self.class_to_idx)
        self.transform = transform
        self.indices = None  # set by subsample(): positions in the full folder listing

    @property
    def targets(self):
        return [s[1] for s in self.samples]

    @property
    def imgs(self):
        return self.samples

    def __len__(self):
        return len(self.samples)

    def load(self, i, rng=None):
        path, label = self.samples[i]
        img = pil_loader(path)
        if self.transform is not None:
            img = self.transform(img, rng if rng is not None else np.random.default_rng(i))
        return img, label

    def __getitem__(self, i):
        return self.load(i)

    def subsample(self, indices):
        """Keep ``samples[indices]`` in the given order (torch Subset semantics)."""
        self.samples = [self.samples[i] for i in indices]
        self.indices = list(indices)
        return self


# ---------------------------------------------------------------- torch-identical randperm
class TorchCPUGenerator:
    """Reproduces ``torch.Generator().manual_seed(seed)`` + ``torch.randperm(n, generator=g)`` on CPU.

    torch seeds its mt19937 with ``seed & 0xffffffff`` (standard init_genrand, like numpy's legacy
    RandomState) and, for n < 2**32 / 20, shuffles ``arange(n)`` with ``z = next_uint32() % (n - i)``,
    swapping positions i and i + z for i = 0 .. n-2.
    """

    def __init__(self, seed):
        self._rs = np.random.RandomState(int(seed) & 0xFFFFFFFF)

    def randperm(self, n):
        n = int(n)
        if n >= (2 ** 32 - 1) // 20:
            raise NotImplementedError('randperm for n >= 2**32/20 uses a different torch algorithm')
        perm = list(range(n))
        if n < 2:
            return perm
        draws = self._rs.randint(0, 2 ** 32, size=n - 1, dtype=np.uint32).tolist()
        for i, r in enumerate(draws):
            j = i + r % (n - i)
            perm[i], perm[j] = perm[j], perm[i]
        return perm


def torch_randperm(n, seed):
    return TorchCPUGenerator(seed).randperm(n)


def stratified_indices(targets, ratio, seed):
    """The original's _stratified_indices, same generator stream, same result."""
    targets = np.asarray(targets)
    g = TorchCPUGenerator(seed)
    keep = []
    for c in np.unique(targets).tolist():
        cls_idx = np.nonzero(targets == c)[0]
        k = max(1, int(round(len(cls_idx) * ratio)))
        perm = g.randperm(len(cls_idx))
        keep.extend(cls_idx[perm[:k]].tolist())
    g2 = TorchCPUGenerator(seed + 1)
    return [keep[i] for i in g2.randperm(len(keep))]


def subsample_indices(targets, ratio, seed, stratified=False):
    """Indices the original build_dataset keeps for ``--dataratio``/``--stratified`` (None = all)."""
    ratio = float(ratio)
    if not 0.0 < ratio < 1.0:
        return None
    if stratified:
        return stratified_indices(targets, ratio, seed)
    n = len(targets)
    return torch_randperm(n, seed)[:max(1, int(n * ratio))]


def build_dataset(is_train, args):
    """``is_train`` is the split name ('train', 'val', 'test'), as in the original."""
    transform = build_transform(is_train, args)
    root = os.path.join(args.data_path, is_train)
    # Each split's own sorted class folders, as the original's ImageFolder per split (a training
    # run first checks that every split has the same ones: check_data_layout).
    dataset = ImageFolder(root, transform=transform)
    if is_train == 'train':
        idx = subsample_indices(dataset.targets, getattr(args, 'dataratio', 1.0),
                                int(getattr(args, 'seed', 0)), bool(getattr(args, 'stratified', False)))
        if idx is not None:
            dataset.subsample(idx)
    return dataset


# ---------------------------------------------------------------- pre-flight checks
def _names(xs):
    return '[' + ', '.join(xs) + ']'


def check_data_layout(data_path, nb_classes=None, need=('train', 'val', 'test')):
    """Raise DatasetError with an actionable message if the split folders are unusable.

    Returns the class list (from the first split in ``need``)."""
    if not os.path.isdir(data_path):
        raise DatasetError(f"--data_path {data_path!r} is not a directory; it must contain "
                           f"{', '.join(s + '/' for s in need)} with one sub-folder per class")
    missing = [s for s in need if not os.path.isdir(os.path.join(data_path, s))]
    if missing:
        raise DatasetError(f"{data_path} has no {', '.join(s + '/' for s in missing)} folder(s); "
                           f"expected {', '.join(s + '/' for s in need)} each with one sub-folder per class")
    ref_split, ref = None, None
    for split in need:
        root = os.path.join(data_path, split)
        classes = find_classes(root)
        if not classes:
            raise DatasetError(f"{root} has no class folders; put each class's images in {root}/<class>/")
        if ref is None:
            ref_split, ref = split, classes
        elif classes != ref:
            extra, lacking = sorted(set(classes) - set(ref)), sorted(set(ref) - set(classes))
            hint = []
            if lacking:
                hint.append(f"missing {_names(lacking)}")
            if extra:
                hint.append(f"extra {_names(extra)}")
            raise DatasetError(f"{split}/ has classes {_names(classes)} but {ref_split}/ has "
                               f"{_names(ref)} ({'; '.join(hint)}); every split needs the same class folders")
        samples = make_samples(root, {c: i for i, c in enumerate(classes)})
        counts = np.bincount([s[1] for s in samples], minlength=len(classes))
        empty = [c for c, k in zip(classes, counts) if k == 0]
        if empty:
            raise DatasetError(f"{split}/ class folder(s) {_names(empty)} contain no images with extensions "
                               f"{', '.join(IMG_EXTENSIONS)}; add images or remove the folder(s) from every split")
    if nb_classes is not None and int(nb_classes) != len(ref):
        raise DatasetError(f"--nb_classes {nb_classes} but {data_path} has {len(ref)} class folders "
                           f"{_names(ref)}; pass --nb_classes {len(ref)}")
    return ref


def check_image(path):
    """None if ``path`` decodes, else a short reason.

    Header + verify() (PNG: every chunk's CRC), then a decode: JPEGs in libjpeg's 1/8-scale draft
    mode, which still Huffman-decodes every block, so damage inside the compressed data is found
    (an end-marker check passed JPEGs that then failed to load mid-epoch) at ~3 ms for a 1024x1024
    image instead of ~4 ms; PNGs are vouched for by their CRCs; other formats are fully decoded."""
    try:
        if os.path.getsize(path) == 0:
            return 'zero-byte file'
        with Image.open(path) as img:
            fmt = img.format
            img.verify()  # PNG: walks every chunk and checks CRCs
        if fmt == 'PNG':
            return None
        with Image.open(path) as img:
            if fmt == 'JPEG':
                img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
        return None
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        return f'{type(e).__name__}: {e}'


def scan_images(datasets, skip_bad=False, num_threads=None):
    """Open and check every image of ``datasets`` (one dataset or a list).

    Default: raise DatasetError listing ALL bad files. ``skip_bad=True``: drop them from each
    dataset's ``samples`` and return the number dropped."""
    if isinstance(datasets, ImageFolder):
        datasets = [datasets]
    paths = sorted({p for ds in datasets for p, _ in ds.samples})
    workers = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        reasons = dict(zip(paths, ex.map(check_image, paths)))
    bad = {p: r for p, r in reasons.items() if r is not None}
    if not bad:
        return 0
    if not skip_bad:
        lines = '\n'.join(f'  {p}: {r}' for p, r in sorted(bad.items()))
        raise DatasetError(f"{len(bad)} unreadable image file(s):\n{lines}\n"
                           f"Remove or fix them, or pass --skip_bad_images to drop them.")
    dropped = 0
    for ds in datasets:
        keep = [k for k, (p, _) in enumerate(ds.samples) if p not in bad]
        dropped += len(ds.samples) - len(keep)
        ds.samples = [ds.samples[k] for k in keep]
        if ds.indices is not None:
            ds.indices = [ds.indices[k] for k in keep]
    return dropped


# ---------------------------------------------------------------- loader
def sample_rng(seed, epoch, rank, index):
    """The augmentation generator of one sample: independent of worker count and batch layout."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(rank), int(index)])


def shard_indices(n, shuffle, seed, epoch, num_shards=1, shard_id=0):
    """torch DistributedSampler: permute (randperm with seed + epoch, same on every rank), pad by
    repeating the head up to a multiple of num_shards, then take every num_shards-th from shard_id."""
    indices = torch_randperm(n, seed + epoch) if shuffle else list(range(n))
    if num_shards > 1:
        total = int(math.ceil(n / num_shards)) * num_shards
        pad = total - n
        if pad:
            indices += (indices * int(math.ceil(pad / max(1, n))))[:pad]
        indices = indices[shard_id:total:num_shards]
    return indices


class _PassSource:
    """Random-access source of the persistent pipeline: token -> (CHW float32, 0-d int32 label, 0-d
    int64 token).

    A token is ``epoch * length + position``. The worker processes are forked once, when the
    pipeline starts, so they cannot see a later ``set_epoch``; they read each sample's epoch from its
    token instead and derive the epoch's order themselves (shard_indices is a pure function).
    Token -1 is a placeholder row of the idle pass a pipeline starts with."""

    def __init__(self, dataset, length, shuffle, shuffle_seed, num_shards, shard_id, seed):
        self.dataset, self.length = dataset, length
        self.shuffle, self.shuffle_seed = shuffle, shuffle_seed
        self.num_shards, self.shard_id, self.seed = num_shards, shard_id, seed
        self._order_epoch, self._order = None, None

    def __len__(self):
        return self.length

    def order(self, epoch):
        if epoch != self._order_epoch:  # one randperm per epoch per worker
            self._order = shard_indices(len(self.dataset), self.shuffle, self.shuffle_seed, epoch,
                                        self.num_shards, self.shard_id)
            self._order_epoch = epoch
        return self._order

    def __getitem__(self, token):
        token = int(token)
        if token == _IDLE:
            return np.zeros(1, dtype=np.float32), np.array(0, dtype=np.int32), np.array(_IDLE, dtype=np.int64)
        epoch, pos = divmod(token, self.length)
        i = self.order(epoch)[pos]
        img, label = self.dataset.load(i, sample_rng(self.seed, epoch, self.shard_id, i))
        return np.asarray(img, dtype=np.float32), np.array(label, dtype=np.int32), np.array(token, dtype=np.int64)


_IDLE = -1


def _pass_sampler(length):
    """Sampler of the persistent pipeline: an idle pass, then the tokens of epoch ``.epoch``.

    MindSpore asks for a pass's ids when the pass starts: the first one when the iterator is created
    (an idle pass: the loader does not know its first epoch yet), each later one synchronously inside
    the consumer's ``next()`` that pulls the end-of-epoch marker. Loader sets ``.epoch`` just before
    that, so no pass can start with a stale epoch (and the tokens coming back are checked anyway).
    (A class built on first use, so that importing this module does not import mindspore.)"""
    global _PassSampler
    if _PassSampler is None:
        import mindspore.dataset as mds

        class _PassSampler(mds.Sampler):
            def __init__(self, length):
                super().__init__(num_samples=length)
                self.length, self.epoch, self.idle = length, None, True

            def __iter__(self):  # a generator: MindSpore's validators call iter() without iterating
                # Sampler.get_indices appends one list per pass to batch_sizes, which only batch
                # samplers ever pop: drop the old ones or a long run grows by `length` per epoch.
                del self.batch_sizes[:]
                if self.idle:  # the first pass, whenever MindSpore's thread gets to it; MindSpore
                    self.idle = False  # wants `length` rows every pass: cheap placeholder rows
                    yield from (_IDLE for _ in range(self.length))
                    return
                base = self.epoch * self.length
                yield from range(base, base + self.length)

            def __deepcopy__(self, memo):  # MindSpore copies the tree; the copy must be this object
                return self
    return _PassSampler(length)


_PassSampler = None


class _Pipeline:
    """One GeneratorDataset -> batch -> iterator(num_epochs=-1), alive across epochs.

    Its worker processes are forked when it is built (by create_loader, i.e. before training has
    allocated gradients, optimizer state and graph memory), never again: a forked worker keeps the
    pre-fork copy of every page the trainer later rewrites, so forking late would pin that memory.

    MindSpore 2.10 starts a pipeline (and forks its workers) only inside the first ``next()``, so a
    helper thread makes that call here; the constructor returns once the workers (and MindSpore's
    cleaning process) are forked, and the helper goes on draining the idle pass in the background
    (its batches, not the end-of-pass marker: pulling that starts the next pass, which must wait for
    ``start_pass``)."""

    def __init__(self, loader, key, length):
        import mindspore.dataset as mds

        self.key, self.length = key, length
        self.sampler = _pass_sampler(length)
        source = _PassSource(loader.dataset, length, loader.shuffle, loader.shuffle_seed,
                             loader.num_shards, loader.shard_id, loader.seed)
        multiprocess = loader.num_workers > 1
        ds = mds.GeneratorDataset(source, column_names=['image', 'label', 'token'], sampler=self.sampler,
                                  num_parallel_workers=loader.num_workers, python_multiprocessing=multiprocess)
        ds = ds.batch(loader.batch_size, drop_remainder=loader.drop_last)
        self.it = ds.create_tuple_iterator(output_numpy=True, num_epochs=-1)
        self.at_pass_end = True  # every batch of the current pass has been handed out
        self._drained = {'batches': 0, 'error': None}  # the idle pass has len(loader) batches, as every pass
        self._drain = threading.Thread(target=_drain_idle_pass, args=(self.it, len(loader), self._drained),
                                       name='retfound-loader-start', daemon=True)
        self._drain.start()
        if multiprocess:
            _wait_for_workers(self.it, self._drain, self._drained)

    def _join_drain(self):
        if self._drain is not None:
            self._drain.join()
            self._drain = None

    def start_pass(self, epoch):
        """Begin the next pass for ``epoch``; False if the pipeline is not where it should be."""
        self._join_drain()
        if self._drained['error'] is not None:
            error, self._drained['error'] = self._drained['error'], None
            raise error  # a worker failed while the pipeline started: report it here, in the trainer
        if not self.at_pass_end:
            return False  # the previous pass was abandoned midway: its batches are still queued
        self.sampler.epoch = epoch
        self.at_pass_end = False
        while True:  # what is left must be idle placeholders and the end-of-epoch marker
            try:
                _, _, tokens = next(self.it)  # pulling the marker makes MindSpore start the next pass
            except StopIteration:
                return True
            if not np.all(tokens == _IDLE):
                return False

    def stop(self):
        self._join_drain()
        self.it.stop()  # stops the C++ tree and its worker processes


def _drain_idle_pass(it, n_batches, state):
    """Helper thread of a new pipeline: the first ``next()`` starts it (forks the workers), the rest
    pull the idle pass's placeholder batches, so that the first epoch does not wait for them."""
    try:
        for _ in range(n_batches):
            _, _, tokens = next(it)
            state['batches'] += 1
            if not np.all(tokens == _IDLE):
                raise RuntimeError('a new data pipeline did not start at its idle pass; this is a bug, please report it')
    except Exception as e:  # StopIteration included: the pass was shorter than it must be
        state['error'] = e if not isinstance(e, StopIteration) else RuntimeError(
            'a new data pipeline ended its idle pass early; this is a bug, please report it')


def _wait_for_workers(it, drain, state, timeout=60.0):
    """Return once MindSpore has forked the pipeline's worker processes and its cleaning process
    (the helper thread's first ``next()`` starts them), or once the first idle batch has arrived
    (all of them are forked by then), or once the helper has stopped."""
    try:
        sample_fn = it.dataset.children[0].sample_fn  # the live copy of our GeneratorDataset
    except (AttributeError, IndexError):
        sample_fn = None
    deadline = time.monotonic() + timeout
    while drain.is_alive() and state['batches'] == 0 and time.monotonic() < deadline:
        monitor = getattr(sample_fn, 'cleaning_process', None)
        if monitor is not None and monitor.pid is not None:
            return
        time.sleep(0.002)


class Loader:
    """Iterates ``(images float32 (B,3,H,W), labels int32 (B,))`` numpy batches for one epoch.

    Call ``set_epoch(e)`` before each epoch (as DistributedSampler.set_epoch) for a new shuffle
    and new augmentations; the order depends only on (shuffle_seed, epoch), never on the rank.

    One MindSpore pipeline (and its worker processes) is started here, idle until the first
    iteration, and reused by every epoch; ``close()`` (or garbage collection) stops it, a later
    iteration starts a new one. One pass at a time: starting a new iteration abandons an unfinished
    one. Same batches as loading ``indices()`` one by one with ``sample_rng`` (tested)."""

    def __init__(self, dataset, batch_size, shuffle, drop_last, num_workers, seed=0,
                 num_shards=None, shard_id=None, shuffle_seed=None):
        self._pipe = None
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.num_workers = max(1, min(int(num_workers or 1), os.cpu_count() or 1))
        self.seed = int(seed)
        self.shuffle_seed = self.seed if shuffle_seed is None else int(shuffle_seed)
        self.num_shards = int(num_shards or 1)
        self.shard_id = int(shard_id or 0)
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f'shard_id {shard_id} not in [0, {self.num_shards})')
        self.epoch = 0
        if len(self) > 0:
            self._pipeline(start=False)  # fork the workers now, while the process is small

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def indices(self):
        return shard_indices(len(self.dataset), self.shuffle, self.shuffle_seed, self.epoch,
                             self.num_shards, self.shard_id)

    def num_samples(self):
        n = len(self.dataset)
        return n if self.num_shards == 1 else int(math.ceil(n / self.num_shards))

    def __len__(self):
        n = self.num_samples()
        return n // self.batch_size if self.drop_last else int(math.ceil(n / self.batch_size))

    def __iter__(self):
        if len(self) == 0:
            return iter(())
        return self._batches()

    def _pass_length(self):
        # With drop_last the remainder is never loaded (as torch's BatchSampler), not loaded and dropped.
        return len(self) * self.batch_size if self.drop_last else self.num_samples()

    def _pipeline(self, start=True):
        """The pipeline, with a pass for ``self.epoch`` started if ``start``. Rebuilt if the dataset
        changed (subsample/scan_images replace ``.samples``) or the last pass was cut short."""
        key = (len(self.dataset), id(getattr(self.dataset, 'samples', None)), self._pass_length())
        if self._pipe is not None and self._pipe.key != key:
            self.close()
        if self._pipe is None:
            self._pipe = _Pipeline(self, key, key[2])
        if start and not self._start_pass():
            self.close()
            self._pipe = _Pipeline(self, key, key[2])
            if not self._start_pass():
                self.close()
                raise RuntimeError('a new data pipeline did not start at its idle pass; this is a bug, please report it')
        return self._pipe

    def _start_pass(self):
        try:
            return self._pipe.start_pass(self.epoch)
        except BaseException:
            self.close()  # a pipeline that failed to start is not reused
            raise

    def _batches(self):
        pipe = self._pipeline()
        length, bs, n_batches = pipe.length, self.batch_size, len(self)
        base = self.epoch * length
        for k in range(n_batches):
            try:
                images, labels, tokens = next(pipe.it)
            except StopIteration:
                tokens = None
            want = np.arange(base + k * bs, base + min((k + 1) * bs, length), dtype=np.int64)
            if tokens is None or not np.array_equal(tokens, want):
                self.close()
                raise RuntimeError(f'data pipeline out of step at epoch {self.epoch}, batch {k}: expected '
                                   f'samples {want[0] - base}..{want[-1] - base}; this is a bug, please report it')
            if k == n_batches - 1:
                pipe.at_pass_end = True
            yield images, labels

    def close(self):
        """Stop the pipeline and its worker processes (a later iteration starts a new one)."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.stop()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: MindSpore may already be torn down
            pass


def create_loader(dataset, batch_size, shuffle, drop_last, num_workers, seed=0,
                  num_shards=None, shard_id=None, shuffle_seed=None):
    """Train: shuffle=True, drop_last=True. Eval: shuffle=False, drop_last=False.

    ``seed`` drives the augmentations (sample_rng) and, unless ``shuffle_seed`` is given, the
    shuffle. PARITY: the original's DistributedSampler is built without a seed, i.e. its shuffle
    always uses seed 0 (main_finetune.py:main); pass shuffle_seed=0 to get its exact order."""
    return Loader(dataset, batch_size, shuffle, drop_last, num_workers, seed, num_shards, shard_id,
                  shuffle_seed)
