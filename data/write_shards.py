"""Write WebDataset shards plus the index readers need.

    python -m data.write_shards imagefolder SRC OUT [--val-fraction 0.1] [--shard-size 1000] [--workers 4] [--seed 0]
    python -m data.write_shards synthetic OUT [--train 8192] [--val 1024] [--size 32] [--objects 1] [--token-labels 16]
    python -m data.write_shards coco IMG_DIR instances_val2017.json OUT --split val
    python -m data.write_shards idx /usr/share/datasets/fashion-mnist OUT [--classes fashion-mnist] [--keep-classes 0-4]
    python -m data.write_shards cifar cifar-10-batches-py OUT [--keep-classes 0,2,5]   # or cifar-100-python

Every writer takes ``--seed`` (the write order; synthetic: also the images) and ``--no-shuffle``,
and ``--upload s3://BUCKET/PREFIX`` to copy the written folder to object storage afterwards.

``imagefolder``: an ImageNet-style tree (``SRC/class_name/*.jpg|jpeg|png``, or ``SRC/train/...``
and ``SRC/val/...`` when those exist). Images are stored as they are (no re-encoding) with
their class index in ``.cls``; unreadable images are counted, listed and skipped. Sample keys
(``class/stem``) are unique within a split: ``train/`` and ``val/`` may reuse file names.
``coco``: COCO images (stored as they are) + ``.json`` boxes (x0, y0, x1, y1 pixels), COCO class ids
kept, ``iscrowd`` kept; the annotation file is copied to ``{split}_coco.json`` for evaluation.
``idx``: MNIST-style IDX files (``train-*`` -> split ``train``, ``t10k-*`` -> ``val``), grey PNGs + ``.cls``.
``cifar``: the python-pickle batches users download (``cifar-10-batches-py``: ``data_batch_1..5`` ->
``train``, ``test_batch`` -> ``val``, names from ``batches.meta``; ``cifar-100-python``: ``train`` /
``test``, fine labels and names from ``meta``, ``--label coarse`` for the 20 superclasses), RGB PNGs +
``.cls``. The pickles are read with an unpickler that admits numpy arrays and nothing else.
``--keep-classes`` (idx, cifar): only those classes (``0-4``, ``5,7,9``), relabelled 0..K-1 in the order
given; ``classes.json`` lists their names and ``shards.json`` the original labels (``class_filter``).
``--train-per-class N`` (idx, cifar): the training split keeps the first N samples of each class in file
order (a smaller class-balanced set for long schedules on few samples); the val split stays whole.
``synthetic``: the embedded default data (``data.synthetic``): ``.png`` + ``.cls`` + ``.json``
(boxes, for detection), and ``{split}_coco.json`` ground truth for COCO evaluation.

All write ``{split}-{n:06d}.tar``, ``classes.json`` and ``shards.json`` (shard names, sample
counts, totals, each shard's size and the byte offset of each of its samples: a reader of a remote
shard starts a ranged request there) into OUT, and refuse an OUT that already holds shards unless ``--overwrite``.
Samples are written in a random order across all shards of a split, drawn from ``--seed`` and the
split name (``--no-shuffle``: folder / id / index order); ``shards.json`` records it
(``"shuffled"``, ``"shuffle_seed"``). The stream shuffles only the shard order and a bounded
buffer, so a class-sorted folder written in folder order would give batches of a few classes.
Shards are byte-for-byte reproducible for a given seed (fixed order, member times and owners).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import sys
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image
from webdataset import TarWriter

from .shards import FORMAT, INDEX_NAME, check_key

log = logging.getLogger("data.write_shards")

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="shard", file=sys.stderr)


def prepare_out(out: Path, overwrite: bool) -> None:
    existing = sorted(p.name for p in out.glob("*.tar")) + ([INDEX_NAME] if (out / INDEX_NAME).exists() else [])
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds shards ({', '.join(existing[:3])}"
                f"{', ...' if len(existing) > 3 else ''}); choose an empty directory or pass --overwrite"
            )
        for name in existing:
            (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_order(items: Sequence, split: str, seed: Optional[int]) -> list:
    """``items`` in the order they are written: a permutation drawn from ``(seed, split name)``, so
    the same seed gives the same shards and splits get independent orders; ``seed=None``: as given."""
    if seed is None:
        return list(items)
    permutation = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(len(items))
    return [items[i] for i in permutation]


def write_split(
    out: Path,
    split: str,
    items: Sequence,
    encode: Callable,
    shard_size: int,
    workers: int,
    progress: bool,
    seed: Optional[int] = None,
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Write ``items`` into shards of ``shard_size`` samples, in ``write_order(items, split, seed)``;
    ``encode(item) -> sample dict`` may raise ``ValueError`` to skip an item. Returns the shard
    entries and the skipped (item, reason) pairs."""
    items = write_order(items, split, seed)
    chunks = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    jobs = [(str(out / f"{split}-{n:06d}.tar"), chunk, encode) for n, chunk in enumerate(chunks)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(_progress(pool.map(_write_shard, jobs), len(jobs), split, progress))
    else:
        results = list(_progress(map(_write_shard, jobs), len(jobs), split, progress))
    shards, skipped = [], []
    for (path, _, _), (count, bad) in zip(jobs, results):
        skipped += bad
        if count:
            offsets, size = sample_offsets(path)
            if len(offsets) != count:
                raise RuntimeError(f"{path}: wrote {count} samples but finds {len(offsets)} sample keys in it")
            shards.append({"name": Path(path).name, "samples": count, "bytes": size, "offsets": offsets})
        else:
            os.unlink(path)
    return shards, skipped


def sample_offsets(path: str) -> tuple[list[int], int]:
    """The byte offset of each sample's first member header in a written shard, and the shard's size:
    a reader of a remote shard starts a ranged request there instead of downloading the head."""
    from webdataset.tariterators import base_plus_ext

    offsets, last = [], None
    with tarfile.open(path) as tar:
        for member in tar:
            key = base_plus_ext(member.name)[0] if member.isfile() else None
            if key is not None and key != last:
                offsets.append(member.offset)
                last = key
    return offsets, os.path.getsize(path)


def _write_shard(job) -> tuple[int, list[tuple[str, str]]]:
    path, chunk, encode = job
    count, skipped = 0, []
    with TarWriter(path, encoder=False, mtime=0, user="toe", group="toe") as writer:
        for item in chunk:
            try:
                sample = encode(item)
            except ValueError as err:
                skipped.append((str(item[0] if isinstance(item, tuple) else item), str(err)))
                continue
            check_key(sample["__key__"])
            writer.write(sample)
            count += 1
    return count, skipped


def write_index(
    out: Path,
    splits: dict[str, list[dict]],
    classes: Sequence[str],
    extra: Optional[dict] = None,
    *,
    shuffle_seed: Optional[int],
) -> dict:
    """``shuffle_seed``: the seed the samples were ordered with (``write_order``), None for as given."""
    (out / "classes.json").write_text(json.dumps({"names": list(classes)}, indent=1))
    meta = {
        "format": FORMAT,
        "classes": "classes.json",
        "shuffled": shuffle_seed is not None,
        "shuffle_seed": shuffle_seed,
        "splits": {name: {"shards": shards, "total": sum(s["samples"] for s in shards)} for name, shards in splits.items()},
    }
    meta.update(extra or {})
    (out / INDEX_NAME).write_text(json.dumps(meta, indent=1))
    return meta


# -- imagefolder --------------------------------------------------------------------------------


def _sanitize(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", part) or "_"


def scan_imagefolder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class directories (expected {root}/CLASS_NAME/*.jpg)")
    files = []
    for index, name in enumerate(classes):
        files += [(p, index) for p in sorted((root / name).rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise ValueError(f"{root} has class directories but no .jpg/.jpeg/.png images")
    return classes, files


def sample_key(root: Path, path: Path) -> str:
    """Stable key from the path below SRC: ``class/stem`` with unsafe characters replaced and a
    short hash of the original path appended when replacing changed anything (no collisions)."""
    relative = path.relative_to(root).with_suffix("")
    key = "/".join(_sanitize(part) for part in relative.parts)
    if key != str(relative).replace(os.sep, "/"):
        key += "-" + hashlib.sha1(str(relative).encode()).hexdigest()[:8]
    return key


def check_unique_keys(items: dict[str, list]) -> None:
    """Sample keys are unique where they are used, within a split's shards (a pre-split tree's ``train/`` and
    ``val/`` may reuse file names, as CIFAR or MNIST exported to PNG do); a collision inside a split (e.g.
    ``3/a.jpg`` and ``3/a.png``) is a ``ValueError`` naming both files."""
    for split, split_items in items.items():
        seen: dict[str, str] = {}
        for path, _, key in split_items:
            if key in seen:
                raise ValueError(
                    f"{seen[key]} and {path} map to the same sample key {key!r} in split {split!r}; rename one of them"
                )
            seen[key] = path


class _EncodeImageFile:
    """Picklable encoder for worker processes: (path, class index, key) -> sample."""

    def __call__(self, item) -> dict:
        path, label, key = item
        try:
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except Exception as err:  # PIL raises many types for broken files
            raise ValueError(f"unreadable image: {type(err).__name__}: {err}") from err
        return {"__key__": key, IMAGE_EXTS[Path(path).suffix.lower()]: data, "cls": str(label).encode()}


def split_of(key: str, val_fraction: float) -> str:
    """Deterministic train/val assignment from the key (stable when files are added or removed)."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 16**8
    return "val" if bucket < val_fraction else "train"


def imagefolder(args) -> dict:
    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise FileNotFoundError(f"source directory {src} does not exist")
    presplit = [name for name in ("train", "val") if (src / name).is_dir()]
    if presplit:
        trees = {name: src / name for name in presplit}
        classes = scan_imagefolder(trees[presplit[0]])[0]
    else:
        trees = {"all": src}
        classes = scan_imagefolder(src)[0]
    prepare_out(out, args.overwrite)
    items: dict[str, list] = {}
    for name, tree in trees.items():
        tree_classes, files = scan_imagefolder(tree)
        if tree_classes != classes:
            raise ValueError(f"{tree} has classes {tree_classes[:5]}..., {trees[presplit[0]]} has {classes[:5]}...")
        for path, label in files:
            key = sample_key(tree, path)
            split = name if presplit else split_of(key, args.val_fraction)
            items.setdefault(split, []).append((str(path), label, key))
    check_unique_keys(items)
    splits, skipped = {}, []
    for split, split_items in sorted(items.items()):
        splits[split], bad = write_split(
            out,
            split,
            split_items,
            _EncodeImageFile(),
            args.shard_size,
            args.workers,
            not args.no_progress,
            _order_seed(args),
        )
        skipped += bad
    meta = write_index(
        out, splits, classes, {"skipped": [{"item": i, "reason": r} for i, r in skipped]}, shuffle_seed=_order_seed(args)
    )
    _report(out, meta, skipped)
    return meta


# -- synthetic ----------------------------------------------------------------------------------


class _EncodeSynthetic:
    def __init__(self, seed: int, size: int, objects: int, token_grid: int = 0, token_k: int = 5) -> None:
        self.seed, self.size, self.objects = seed, size, objects
        self.token_grid, self.token_k = token_grid, token_k  # oracle token-label maps when token_grid > 0

    def __call__(self, item) -> dict:
        from .synthetic import draw_sample

        split, index = item
        sample = draw_sample(index, self.seed, self.size, self.objects)
        png = io.BytesIO()
        Image.fromarray(sample.image).save(png, format="PNG")
        boxes = {
            "boxes": sample.boxes.round(2).tolist(),
            "labels": sample.box_labels.tolist(),
            "width": self.size,
            "height": self.size,
            "image_id": index,
        }
        out = {
            "__key__": f"{split}_{index:08d}",
            "png": png.getvalue(),
            "cls": str(sample.label).encode(),
            "json": json.dumps(boxes).encode(),
        }
        if self.token_grid:
            from .synthetic import oracle_token_maps
            from .token_labels import encode_maps

            out.update(encode_maps(*oracle_token_maps(index, self.seed, self.size, self.token_grid, self.token_k)))
        return out


def coco_ground_truth(split: str, indices: Iterable[int], seed: int, size: int, objects: int, classes) -> dict:
    """COCO-format ground truth of a synthetic split (for pycocotools evaluation)."""
    from .synthetic import draw_sample

    images, annotations = [], []
    for index in indices:
        sample = draw_sample(index, seed, size, objects)
        images.append({"id": index, "file_name": f"{split}_{index:08d}.png", "width": size, "height": size})
        for box, label in zip(sample.boxes.tolist(), sample.box_labels.tolist()):
            x0, y0, x1, y1 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": int(label),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": name} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def synthetic(args) -> dict:
    from .synthetic import CLASS_NAMES

    out = Path(args.out)
    prepare_out(out, args.overwrite)
    ranges = {"train": range(args.train), "val": range(10**7, 10**7 + args.val)}
    encode = _EncodeSynthetic(args.seed, args.size, args.objects, args.token_labels, args.token_k)
    splits = {}
    for split, indices in ranges.items():
        if len(indices):
            splits[split], _ = write_split(
                out,
                split,
                [(split, i) for i in indices],
                encode,
                args.shard_size,
                args.workers,
                not args.no_progress,
                _order_seed(args),
            )
            gt = coco_ground_truth(split, indices, args.seed, args.size, args.objects, CLASS_NAMES)
            (out / f"{split}_coco.json").write_text(json.dumps(gt))
    extra = {"synthetic": {"seed": args.seed, "size": args.size, "objects": args.objects}}
    if args.token_labels:
        from .token_labels import index_block

        extra["token_labels"] = index_block("oracle", args.size, args.token_k, args.token_labels, args.token_labels)
    meta = write_index(out, splits, CLASS_NAMES, extra, shuffle_seed=_order_seed(args))
    _report(out, meta, [])
    return meta


def synthetic_holds(path: str, *, size: int, objects: int, token_labels: int = 0) -> None:
    """Refuse (``ShardIndexError``, a start-up refusal) a folder whose shards are not the embedded synthetic
    data of this geometry (another image size or object count), or that carry no dense token labels when
    ``token_labels`` > 0 asks for them. Token labels of another grid or source are used as they are (the
    stream reads the grid from the index; ``token_labels`` is what gets written when the folder is
    missing) and said in the log. The index is read through ``ShardIndex.load``, so a broken
    ``shards.json`` is named with its line and column."""
    from .shards import ShardIndex, ShardIndexError

    index = ShardIndex.load(path)
    found = index.meta.get("synthetic") or {}
    wanted = {"size": size, "objects": objects}
    if any(found.get(key) != value for key, value in wanted.items()):
        raise ShardIndexError(
            f"{path} holds synthetic shards with {found}, but the recipe wants {wanted}: "
            f"point data.path elsewhere or delete the folder"
        )
    block = index.meta.get("token_labels")
    if token_labels and not isinstance(block, dict):
        raise ShardIndexError(
            f"{path} holds synthetic shards without token labels, but the recipe wants them "
            f"(data.synthetic_token_labels={token_labels}): delete the folder to have them "
            f"written, or point data.path elsewhere"
        )
    if token_labels and (block.get("teacher"), block.get("h"), block.get("w")) != ("oracle", token_labels, token_labels):
        log.info(
            "%s carries token labels from %s on a %sx%s grid (the recipe would write oracle maps on %dx%d): "
            "using them as they are",
            path,
            block.get("teacher"),
            block.get("h"),
            block.get("w"),
            token_labels,
            token_labels,
        )


def write_synthetic_once(path: str, *, size: int, objects: int, token_labels: int = 0) -> None:
    """Write the embedded synthetic shards (with oracle token labels on a ``token_labels`` grid, if > 0) to
    ``path`` through a private folder renamed into place, so two jobs that start on the same empty path at
    once both end up reading one complete copy."""
    import shutil

    log.info("writing the embedded synthetic shards to %s", path)
    target = Path(path)
    private = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(private, ignore_errors=True)
    extra = ["--token-labels", str(token_labels)] if token_labels else []
    code = main(["synthetic", str(private), "--size", str(size), "--objects", str(objects), "--no-progress", *extra])
    if code != 0:
        shutil.rmtree(private, ignore_errors=True)
        raise ValueError(f"writing the embedded synthetic shards to {path} failed (see the log above)")
    try:
        private.rename(target)  # atomic; replaces an empty folder, fails on a filled one
    except OSError:
        if not target.is_dir() or not any(target.iterdir()):
            raise
        log.info("%s was written meanwhile by another job: using that copy", path)
        shutil.rmtree(private)


# -- idx (MNIST, Fashion-MNIST) -----------------------------------------------------------------

IDX_SPLITS = {"train": "train", "val": "t10k"}  # shard split -> file prefix (the test set is the eval split)
IDX_CLASSES = {
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],  # zalandoresearch/fashion-mnist README, labels 0-9
    "mnist": [str(d) for d in range(10)],
}
_IDX_CACHE: dict = {}


def idx_files(src: Path, prefix: str) -> tuple[Path, Path]:
    """``{prefix}-images-idx3-ubyte[.gz]`` and ``{prefix}-labels-idx1-ubyte[.gz]`` in ``src``."""
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [src / f"{prefix}-{kind}{ext}" for ext in (".gz", "")]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{src} has no {prefix}-{kind}[.gz]")
        found.append(path)
    return found[0], found[1]


class _EncodeIdx:
    """Picklable: (split, index) -> a PNG of the grey image and its label (the arrays load once per process);
    ``relabel``: original label -> written label (``--keep-classes``)."""

    def __init__(self, files: dict[str, tuple[str, str]], relabel: Optional[dict] = None) -> None:
        self.files = files
        self.relabel = relabel

    def __call__(self, item) -> dict:
        from .idx import read_idx_pair

        split, index = item
        files = tuple(self.files[split])  # keyed by the files: one process may write several folders
        if files not in _IDX_CACHE:
            _IDX_CACHE[files] = read_idx_pair(*files)
        images, labels = _IDX_CACHE[files]
        png = io.BytesIO()
        Image.fromarray(images[index], mode="L").save(png, format="PNG")
        label = int(labels[index]) if self.relabel is None else self.relabel[int(labels[index])]
        return {"__key__": f"{split}_{index:06d}", "png": png.getvalue(), "cls": str(label).encode()}


def idx(args) -> dict:
    from .idx import read_idx_pair

    src, out = Path(args.src), Path(args.out)
    files = {split: tuple(str(p) for p in idx_files(src, prefix)) for split, prefix in IDX_SPLITS.items()}
    all_labels = {}
    names = IDX_CLASSES.get(args.classes) or args.classes.split(",")
    for split, (images, labels) in files.items():
        _, y = read_idx_pair(images, labels)  # checked before anything is written
        all_labels[split] = y
        if args.classes in IDX_CLASSES and y.max() >= len(IDX_CLASSES[args.classes]):
            raise ValueError(
                f"{labels} has label {y.max()}, but {args.classes} has {len(IDX_CLASSES[args.classes])} classes"
            )
    indices, relabel, kept_names, block = class_filter(all_labels, args.keep_classes, names, args.train_per_class)
    prepare_out(out, args.overwrite)
    encode = _EncodeIdx(files, relabel)
    splits = {
        split: write_split(
            out,
            split,
            [(split, i) for i in chosen],
            encode,
            args.shard_size,
            args.workers,
            not args.no_progress,
            _order_seed(args),
        )[0]
        for split, chosen in indices.items()
    }
    meta = write_index(out, splits, kept_names, {"source": {"idx": str(src)}, **block}, shuffle_seed=_order_seed(args))
    _report(out, meta, [])
    return meta


# -- class filter (idx, cifar) ------------------------------------------------------------------


def parse_class_list(text: str, num_classes: int) -> list[int]:
    """``"0-4"`` / ``"5,7,9"`` / ``"0-2,8"`` -> original labels in that order; each in [0, num_classes), no repeats."""
    labels: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"--keep-classes {text!r}: {part!r} is not a label or a range like 0-4")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f"--keep-classes {text!r}: the range {part} is empty")
        labels += range(first, last + 1)
    bad = [label for label in labels if label >= num_classes]
    if bad:
        raise ValueError(f"--keep-classes {text!r}: label {bad[0]} is not below the data set's {num_classes} classes")
    if len(set(labels)) != len(labels):
        raise ValueError(f"--keep-classes {text!r} names a class twice")
    return labels


def class_filter(
    labels_by_split: dict[str, np.ndarray],
    keep: Optional[str],
    names: Sequence[str],
    train_per_class: Optional[int] = None,
):
    """``(indices per split, new label of each original label or None, kept names, index block)`` for
    ``--keep-classes`` and ``--train-per-class``; without them every sample, labels unchanged.

    ``train_per_class``: the ``train`` split keeps the first N samples of each (kept) class in file order
    (a smaller, class-balanced training set; the other splits stay whole)."""
    kept = list(range(len(names))) if keep is None else parse_class_list(keep, len(names))
    relabel = None if keep is None else {original: new for new, original in enumerate(kept)}
    indices = {split: [int(i) for i in np.flatnonzero(np.isin(y, kept))] for split, y in labels_by_split.items()}
    block: dict = {}
    if keep is not None:
        block["class_filter"] = {"kept_original_labels": kept, "relabelled": "original label kept[i] is written as i"}
    if train_per_class is not None:
        if train_per_class < 1:
            raise ValueError(f"--train-per-class must be >= 1, got {train_per_class}")
        y = labels_by_split["train"]
        for label in kept:
            found = int(np.count_nonzero(y == label))
            if found < train_per_class:
                raise ValueError(
                    f"--train-per-class {train_per_class}: class {label} ({names[label]}) has {found} training samples"
                )
        indices["train"] = sorted(int(i) for label in kept for i in np.flatnonzero(y == label)[:train_per_class])
        block["train_per_class"] = {"samples": train_per_class, "chosen": "the first N of each class in file order"}
    return indices, relabel, [names[label] for label in kept], block


# -- cifar (python pickles) ---------------------------------------------------------------------


class _NumpyOnlyUnpickler:
    """Reads the CIFAR pickles (dicts of bytes keys, lists and numpy arrays) and refuses any other global:
    a pickle may name any callable, and these files come from the internet."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    @classmethod
    def load(cls, path: Path) -> dict:
        import pickle

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) not in cls.ALLOWED:
                    raise pickle.UnpicklingError(f"{path} names {module}.{name}: not a CIFAR batch")
                return super().find_class(module, name)

        try:
            with open(path, "rb") as f:
                data = Restricted(f, encoding="bytes").load()
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: cannot read as a CIFAR pickle: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a CIFAR pickle holds a dict, got {type(data).__name__}")
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in data.items()}


CIFAR_LAYOUTS = {  # folder -> (train files, eval files, meta file, names key, labels key by --label)
    "cifar-10": (
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        {"fine": "label_names"},
        {"fine": "labels"},
    ),
    "cifar-100": (
        ["train"],
        ["test"],
        "meta",
        {"fine": "fine_label_names", "coarse": "coarse_label_names"},
        {"fine": "fine_labels", "coarse": "coarse_labels"},
    ),
}


def cifar_layout(src: Path) -> str:
    found = [
        name
        for name, (train, test, meta, _, _) in CIFAR_LAYOUTS.items()
        if all((src / f).is_file() for f in [*train, *test, meta])
    ]
    if not found:
        raise FileNotFoundError(
            f"{src} is neither cifar-10-batches-py (data_batch_1..5, test_batch, batches.meta) "
            f"nor cifar-100-python (train, test, meta)"
        )
    return found[0]


def read_cifar_split(src: Path, files: Sequence[str], labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, 32, 32, 3]`` and int64 labels ``[N]`` of the batches ``files``."""
    images, labels = [], []
    for name in files:
        batch = _NumpyOnlyUnpickler.load(src / name)
        if "data" not in batch or labels_key not in batch:
            raise ValueError(f"{src / name} has no 'data' / {labels_key!r} entries (keys: {sorted(batch)})")
        data, y = np.asarray(batch["data"]), np.asarray(batch[labels_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(y) != len(data):
            raise ValueError(
                f"{src / name}: expected uint8 data [N, 3072] and N labels, got {data.dtype} "
                f"{list(data.shape)} and {len(y)} labels"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # R, G, B planes of 1024 each
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


class _EncodeCifar:
    """Picklable: (split, index) -> an RGB PNG and its (relabelled) class; the batches load once per process."""

    def __init__(self, src: str, files: dict[str, list[str]], labels_key: str, relabel: Optional[dict]) -> None:
        self.src, self.files, self.labels_key, self.relabel = src, files, labels_key, relabel
        self.arrays: dict = {}

    def __call__(self, item) -> dict:
        split, index = item
        if split not in self.arrays:
            self.arrays[split] = read_cifar_split(Path(self.src), self.files[split], self.labels_key)
        images, labels = self.arrays[split]
        label = int(labels[index]) if self.relabel is None else self.relabel[int(labels[index])]
        png = io.BytesIO()
        Image.fromarray(images[index], mode="RGB").save(png, format="PNG")
        return {"__key__": f"{split}_{index:06d}", "png": png.getvalue(), "cls": str(label).encode()}


def cifar(args) -> dict:
    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise FileNotFoundError(f"source directory {src} does not exist")
    layout = cifar_layout(src)
    train_files, test_files, meta_file, names_keys, labels_keys = CIFAR_LAYOUTS[layout]
    if args.label not in labels_keys:
        raise ValueError(f"--label {args.label}: {layout} has {', '.join(labels_keys)} labels")
    meta = _NumpyOnlyUnpickler.load(src / meta_file)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_keys[args.label], [])]
    if not names:
        raise ValueError(f"{src / meta_file} has no {names_keys[args.label]!r}")
    files = {"train": train_files, "val": test_files}
    labels = {}
    for split, split_files in files.items():  # read and checked before anything is written
        _, y = read_cifar_split(src, split_files, labels_keys[args.label])
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise ValueError(f"{src}: label {int(y.max())} of split {split} has no name ({len(names)} classes)")
        labels[split] = y
    indices, relabel, kept_names, block = class_filter(labels, args.keep_classes, names, args.train_per_class)
    prepare_out(out, args.overwrite)
    encode = _EncodeCifar(str(src), files, labels_keys[args.label], relabel)
    splits = {
        split: write_split(
            out,
            split,
            [(split, i) for i in chosen],
            encode,
            args.shard_size,
            args.workers,
            not args.no_progress,
            _order_seed(args),
        )[0]
        for split, chosen in indices.items()
    }
    meta_out = write_index(
        out, splits, kept_names, {"source": {layout: str(src), "label": args.label}, **block}, shuffle_seed=_order_seed(args)
    )
    _report(out, meta_out, [])
    return meta_out


# -- coco ---------------------------------------------------------------------------------------


class _EncodeCocoImage:
    """Picklable: (image record, its annotations) -> sample with the original image bytes and boxes."""

    def __init__(self, image_dir: str) -> None:
        self.image_dir = Path(image_dir)

    def __call__(self, item) -> dict:
        image, annotations = item
        path = self.image_dir / image["file_name"]
        suffix = path.suffix.lower()
        if suffix not in IMAGE_EXTS:
            raise ValueError(f"not a .jpg/.png image: {path.name}")
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as pil:
                pil.verify()
        except Exception as err:  # PIL raises many types for broken files
            raise ValueError(f"unreadable image: {type(err).__name__}: {err}") from err
        boxes, labels, crowd = [], [], []
        for ann in annotations:
            x, y, w, h = ann["bbox"]
            if w <= 0 or h <= 0:
                continue  # degenerate boxes exist in COCO; they carry no signal
            boxes.append([x, y, x + w, y + h])
            labels.append(int(ann["category_id"]))
            crowd.append(int(ann.get("iscrowd", 0)))
        meta = {
            "boxes": boxes,
            "labels": labels,
            "iscrowd": crowd,
            "image_id": int(image["id"]),
            "width": int(image["width"]),
            "height": int(image["height"]),
        }
        key = f"{int(image['id']):012d}"
        return {"__key__": key, IMAGE_EXTS[suffix]: data, "json": json.dumps(meta).encode()}


def coco(args) -> dict:
    image_dir, annotation_file, out = Path(args.images), Path(args.annotations), Path(args.out)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image directory {image_dir} does not exist")
    if not annotation_file.is_file():
        raise FileNotFoundError(f"annotation file {annotation_file} does not exist")
    ground_truth = json.loads(annotation_file.read_text())
    for key in ("images", "annotations", "categories"):
        if key not in ground_truth:
            raise ValueError(f"{annotation_file} is not COCO detection json: no {key!r}")
    prepare_out(out, args.overwrite)
    by_image: dict[int, list] = {}
    for ann in ground_truth["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    items = [(image, by_image.get(int(image["id"]), [])) for image in sorted(ground_truth["images"], key=lambda i: i["id"])]
    shards, skipped = write_split(
        out,
        args.split,
        items,
        _EncodeCocoImage(str(image_dir)),
        args.shard_size,
        args.workers,
        not args.no_progress,
        _order_seed(args),
    )
    names = [""] * (max(c["id"] for c in ground_truth["categories"]) + 1)  # class ids are kept as they are
    for category in ground_truth["categories"]:
        names[int(category["id"])] = category["name"]
    (out / f"{args.split}_coco.json").write_text(annotation_file.read_text())
    meta = write_index(
        out,
        {args.split: shards},
        names,
        {"skipped": [{"item": i, "reason": r} for i, r in skipped]},
        shuffle_seed=_order_seed(args),
    )
    _report(out, meta, skipped)
    return meta


def _order_seed(args) -> Optional[int]:
    return None if args.no_shuffle else args.seed


def _report(out: Path, meta: dict, skipped) -> None:
    for split, info in meta["splits"].items():
        log.info("%s: %d samples in %d shards", split, info["total"], len(info["shards"]))
    log.info(
        "order: %s",
        f"shuffled across shards (seed {meta['shuffle_seed']})"
        if meta["shuffled"]
        else "as listed (--no-shuffle): mind class-sorted folders, the stream only mixes within its buffer",
    )
    if skipped:
        log.warning("skipped %d unreadable images:", len(skipped))
        for item, reason in skipped[:20]:
            log.warning("  %s: %s", item, reason)
        if len(skipped) > 20:
            log.warning("  ... and %d more (all listed in %s)", len(skipped) - 20, out / INDEX_NAME)
    log.info("wrote %s", out / INDEX_NAME)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data.write_shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    common.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    common.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument(
        "--no-shuffle",
        action="store_true",
        help="write samples in folder / image-id / index order instead of a seeded random order",
    )
    common.add_argument(
        "--upload",
        metavar="s3://BUCKET/PREFIX",
        help="then copy OUT to object storage (boto3: credentials and AWS_ENDPOINT_URL as the aws CLI "
        "takes them); shards.json goes last",
    )
    common.add_argument("--s3-endpoint", help="S3 endpoint URL for --upload (default: AWS_ENDPOINT_URL, then AWS)")
    order_seed = argparse.ArgumentParser(add_help=False)
    order_seed.add_argument("--seed", type=int, default=0, help="seed of the random write order")
    folder = sub.add_parser("imagefolder", parents=[common, order_seed], help="SRC/class_name/*.jpg -> shards")
    folder.add_argument("src")
    folder.add_argument("out")
    folder.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="share of images put in a val split (by key hash); ignored when SRC has train/ and val/",
    )
    coco_parser = sub.add_parser(
        "coco", parents=[common, order_seed], help="COCO images + instances json -> detection shards"
    )
    coco_parser.add_argument("images", help="the image folder (file_name in the json is relative to it)")
    coco_parser.add_argument("annotations", help="instances_*.json")
    coco_parser.add_argument("out")
    coco_parser.add_argument("--split", default="train", help="split name for the shards (train, val, ...)")
    idx_parser = sub.add_parser(
        "idx", parents=[common, order_seed], help="MNIST-style IDX files (train-* and t10k-*) -> train and val shards"
    )
    idx_parser.add_argument(
        "src",
        help="the folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], e.g. "
        "/usr/share/datasets/fashion-mnist (Debian: dataset-fashion-mnist)",
    )
    idx_parser.add_argument("out")
    idx_parser.add_argument(
        "--classes", default="fashion-mnist", help="fashion-mnist, mnist, or comma-separated class names in label order"
    )
    keep_help = (
        "only these classes, e.g. 0-4 or 5,7,9 (original labels), relabelled 0..K-1 in the order given "
        "(a disjoint pre-training / fine-tuning split)"
    )
    idx_parser.add_argument("--keep-classes", metavar="LABELS", help=keep_help)
    per_class_help = "the training split keeps the first N samples of each class (file order); val stays whole"
    idx_parser.add_argument("--train-per-class", type=int, metavar="N", help=per_class_help)
    cifar_parser = sub.add_parser(
        "cifar", parents=[common, order_seed], help="CIFAR-10 / CIFAR-100 python pickles -> train and val shards"
    )
    cifar_parser.add_argument("src", help="cifar-10-batches-py or cifar-100-python (the folders in the downloaded tar.gz)")
    cifar_parser.add_argument("out")
    cifar_parser.add_argument(
        "--label",
        default="fine",
        choices=("fine", "coarse"),
        help="CIFAR-100: the 100 fine classes or the 20 coarse superclasses",
    )
    cifar_parser.add_argument("--keep-classes", metavar="LABELS", help=keep_help)
    cifar_parser.add_argument("--train-per-class", type=int, metavar="N", help=per_class_help)
    synth = sub.add_parser("synthetic", parents=[common], help="the embedded default data set")
    synth.add_argument("out")
    synth.add_argument("--train", type=int, default=8192)
    synth.add_argument("--val", type=int, default=1024)
    synth.add_argument("--size", type=int, default=32)
    synth.add_argument("--objects", type=int, default=1, help="objects per image (1 for classification)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the images and of the random write order")
    synth.add_argument(
        "--token-labels",
        type=int,
        default=0,
        metavar="GRID",
        help="also write exact (oracle) dense token labels on a GRID x GRID map (KEY.tlv.npy / "
        "KEY.tli.npy, LV-ViT token labelling); 0: none",
    )
    synth.add_argument("--token-k", type=int, default=5, help="classes kept per map cell (top-k) with --token-labels")
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.workers < 1:
        parser.error("--shard-size and --workers must be >= 1")
    if args.command == "imagefolder" and not 0.0 <= args.val_fraction < 1.0:
        parser.error("--val-fraction must be in [0, 1)")
    if args.command == "synthetic" and (args.train < 0 or args.val < 0 or args.train + args.val == 0 or args.objects < 1):
        parser.error("--train/--val must be >= 0 (not both 0) and --objects >= 1")
    if (
        args.command == "synthetic"
        and args.token_labels
        and (args.objects != 1 or args.size % args.token_labels or not 1 <= args.token_k <= 32)
    ):
        parser.error("--token-labels GRID needs --objects 1, a GRID that divides --size, and 1 <= --token-k <= 32")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    if args.upload:
        from .remote import check_location

        try:
            check_location(args.upload)
        except ValueError as err:
            log.error("--upload: %s", err)
            return 2
    try:
        writers = {"imagefolder": imagefolder, "coco": coco, "synthetic": synthetic, "idx": idx, "cifar": cifar}
        writers[args.command](args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        log.error("%s", err)
        return 2
    if args.upload:
        from .remote import RemoteError, RemoteOptions, upload_folder

        try:
            keys = upload_folder(args.out, args.upload, RemoteOptions(s3_endpoint=args.s3_endpoint))
        except (RemoteError, ValueError) as err:
            log.error("%s", err)
            return 1
        log.info("uploaded %d files to %s", len(keys), args.upload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
