"""Loading preference pairs from shards: random access, a resumable DDP-safe batch loader, and a streaming pipeline.

- :class:`PairDataset` indexes the tar members of a dataset folder (byte offsets) for random access.
- :class:`PairLoader` is what the trainer uses: an infinite, deterministic iterator of batches whose position is a
  small cursor (``state_dict``), so a resumed run continues exactly where it stopped without replaying data.
- :func:`webdataset_pipeline` streams shards (local paths or URLs) with WebDataset; it is the multi-node path for
  data too large to index, with node splitting by rank.
- :func:`load_pairs_arrays` stacks (some of) a dataset into arrays, for the toy pretraining and held-out metrics.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from sdpo.data.integrity import verify_dataset, verify_dataset_with_digest
from sdpo.data.messages import one_line
from sdpo.data.shards import index_shard
from sdpo.errors import DataError

_FIELDS = ("win", "lose", "txt", "json")


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> RGB uint8 array HxWx3."""
    with Image.open(BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def decode_pair(raw: dict[str, bytes], where: str, resolution: int | None = None) -> dict[str, Any]:
    """Decode one sample's raw fields; any failure is a :class:`DataError` starting with ``where`` (shard and key).

    Returns ``{"win", "lose": uint8 HxWx3, "caption": str, "meta": dict}``; with ``resolution`` both images must be
    that many pixels square.
    """
    item: dict[str, Any] = {}
    for stem in ("win", "lose"):
        try:
            image = decode_image(raw[stem])
        except Exception as err:  # a PIL failure of any kind: name the sample, never a raw traceback
            detail = f"{type(err).__name__}: {one_line(err)}"
            raise DataError(f"{where}: the {stem} image does not decode ({detail})") from None
        if resolution is not None and image.shape[:2] != (resolution, resolution):
            height, width = image.shape[:2]
            expected = f"{resolution}x{resolution}"
            raise DataError(f"{where}: the {stem} image is {width}x{height}, the manifest says {expected}")
        item[stem] = image
    try:
        item["caption"] = raw["txt"].decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: the caption is not UTF-8 ({err})") from None
    try:
        item["meta"] = json.loads(raw["json"])
    except ValueError as err:
        raise DataError(f"{where}: the json field is not valid JSON ({err})") from None
    return item


def _field_names(fields: Sequence[str]) -> dict[str, str]:
    """``["win.png", "lose.png", "txt", "json"]`` -> ``{"win": "win.png", ...}``."""
    by_stem = {name.split(".", 1)[0]: name for name in fields}
    return {stem: by_stem[stem] for stem in _FIELDS if stem in by_stem}


class PairDataset(Dataset):
    """Random access to the pairs of a dataset folder written by ``sdpo ingest``.

    ``dataset[i]`` is ``{"win": uint8 HxWx3, "lose": uint8 HxWx3, "caption": str, "key": str, "meta": dict}``.
    Reads use ``os.pread`` on per-process file descriptors, so the dataset is safe in DataLoader workers.

    Opening verifies every shard against the manifest first (:func:`~sdpo.data.integrity.verify_dataset`: size,
    sha256, tar structure, sample count; cached), so no sample of a changed shard is ever used; a sample that still
    fails to decode raises a :class:`DataError` naming its shard and key.
    """

    # The byte-offset index is our own rather than webdataset's ``wids``: wids is not in the installed webdataset
    # 1.0.2 wheel (a separate ``wids`` package), and its ShardListDataset re-mmaps and re-parses a whole shard on each
    # miss of a 10-shard per-process LRU (near every access under a global permutation of many shards), parses
    # headers without their checksums, and copies local shards into /tmp; this index is built once, after
    # verification, as numpy arrays that travel to workers with the pickled dataset.
    def __init__(self, shards_dir: str | Path):
        self.root = Path(shards_dir)
        self.manifest, self.digest = verify_dataset_with_digest(self.root)
        self.resolution: int = self.manifest["resolution"]
        self.shard_paths = [self.root / shard["name"] for shard in self.manifest["shards"]]
        keys: list[str] = []
        shard_ids: list[np.ndarray] = []
        offsets: list[np.ndarray] = []
        sizes: list[np.ndarray] = []
        for shard_id, (path, shard) in enumerate(zip(self.shard_paths, self.manifest["shards"], strict=True)):
            entries = index_shard(path, expected_pairs=shard["pairs"])
            table = np.zeros((len(entries), 2, len(_FIELDS)), dtype=np.int64)
            for row, (key, members) in enumerate(entries):
                names = _field_names(list(members))
                for col, stem in enumerate(_FIELDS):
                    ref = members[names[stem]]
                    table[row, :, col] = (ref.offset, ref.size)
                keys.append(key)
            shard_ids.append(np.full(len(entries), shard_id, dtype=np.int32))
            offsets.append(table[:, 0])
            sizes.append(table[:, 1])
        self.keys = keys
        self._shard_ids = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self._offsets = np.concatenate(offsets) if offsets else np.zeros((0, len(_FIELDS)), np.int64)
        self._sizes = np.concatenate(sizes) if sizes else np.zeros((0, len(_FIELDS)), np.int64)
        self._fds: dict[int, int] = {}
        self._fd_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}  # descriptors do not travel to spawned workers; they reopen lazily
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}

    def _fd(self, shard_id: int) -> int:
        if self._fd_pid != os.getpid():  # forked worker: do not share (or close) the parent's descriptors
            self._fds, self._fd_pid = {}, os.getpid()
        if shard_id not in self._fds:
            self._fds[shard_id] = os.open(self.shard_paths[shard_id], os.O_RDONLY)
        return self._fds[shard_id]

    def read_fields(self, i: int) -> dict[str, bytes]:
        """The raw bytes of sample ``i``: ``{"win", "lose", "txt", "json"}``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair index {i} out of range for {len(self)} pairs")
        i = i % len(self)
        fd = self._fd(int(self._shard_ids[i]))
        return {
            stem: os.pread(fd, int(self._sizes[i, col]), int(self._offsets[i, col])) for col, stem in enumerate(_FIELDS)
        }

    def describe(self, i: int) -> str:
        """``"<shard path>: sample '<key>'"``: where sample ``i`` lives, for messages."""
        return f"{self.shard_paths[int(self._shard_ids[i])]}: sample {self.keys[i]!r}"

    def __getitem__(self, i: int) -> dict[str, Any]:
        raw = self.read_fields(i)
        i = i % len(self)
        item = decode_pair(raw, self.describe(i), self.resolution)
        return {"win": item["win"], "lose": item["lose"], "caption": item["caption"], "key": self.keys[i],
                "meta": item["meta"]}

    def item(self, i: int, flip: bool) -> dict[str, Any]:
        """``dataset[i]``, mirrored left-right when ``flip`` (the winner and loser alike): what the loader uses."""
        item = self[i]
        if flip:
            item["win"] = np.ascontiguousarray(item["win"][:, ::-1])
            item["lose"] = np.ascontiguousarray(item["lose"][:, ::-1])
        return item

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_pairs(items)


# --- the resumable loader -----------------------------------------------------------------------------------


def _generator(seed: int, epoch: int, stream: str) -> torch.Generator:
    """A torch generator for one (seed, epoch, purpose), independent of every other."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))


@dataclass(frozen=True)
class SampleFailure:
    """A sample that could not be loaded, carried as data so a DataLoader worker's error stays one clean line."""

    message: str


def collate_pairs(items: list[dict[str, Any] | SampleFailure]) -> dict[str, Any] | SampleFailure:
    """Stack pairs into ``{"win", "lose": float32 [B, 3, H, W] in [-1, 1], "caption", "key": lists}``.

    Items placed by :class:`PairLoader` also give ``"index"`` (dataset position) and ``"epoch"`` lists.
    A :class:`SampleFailure` among the items is returned instead of a batch.
    """
    for item in items:
        if isinstance(item, SampleFailure):
            return item

    def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        return batch / 127.5 - 1.0

    return {
        "win": to_tensor([item["win"] for item in items]),
        "lose": to_tensor([item["lose"] for item in items]),
        "caption": [item["caption"] for item in items],
        "key": [item["key"] for item in items],
        **placement(items),
    }


def placement(items: list[dict[str, Any]]) -> dict[str, list[int]]:
    """The ``"index"`` and ``"epoch"`` lists of items placed by :class:`PairLoader` (empty otherwise)."""
    if not items or "epoch" not in items[0]:
        return {}
    return {"index": [int(item["index"]) for item in items], "epoch": [int(item["epoch"]) for item in items]}


def flip_plan(seed: int, epoch: int, n: int) -> np.ndarray:
    """Which of ``n`` pairs (by dataset position) are mirrored in ``epoch``: drawn from (seed, epoch) alone."""
    return torch.randint(0, 2, (n,), generator=_generator(seed, epoch, "flip")).bool().numpy()


class _PlacedView(Dataset):
    """``view[(i, flip, epoch)]`` is ``dataset.item(i, flip)`` with its dataset position and epoch added.

    The dataset mirrors the pair when ``flip`` (image shards flip pixels; a latent cache picks the mirrored
    latents).
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: tuple[int, bool, int]) -> dict[str, Any] | SampleFailure:
        i, flip, epoch = index
        try:
            item = self.dataset.item(i, flip)
        except DataError as err:  # raised in a worker, torch would wrap it in a multi-line traceback text
            return SampleFailure(str(err))
        item["index"], item["epoch"] = i, epoch
        return item


class _CursorBatches(Sampler):
    """Infinite batches of ``(index, flip, epoch)`` for one rank, starting at a cursor (epoch, batch)."""

    def __init__(self, loader: PairLoader, epoch: int, batch: int):
        self.loader, self.epoch, self.batch = loader, epoch, batch

    def __iter__(self) -> Iterator[list[tuple[int, bool, int]]]:
        epoch, start = self.epoch, self.batch
        while True:
            indices, flips = self.loader.epoch_plan(epoch)
            for b in range(start, len(indices)):
                yield [(int(i), bool(flips[i]), epoch) for i in indices[b]]
            epoch, start = epoch + 1, 0


class PairLoader:
    """Infinite, deterministic, resumable batches of pairs for one rank of ``world_size``.

    Epoch ``e`` visits a permutation of the pairs drawn from (seed, e), truncated to a multiple of
    ``world_size * batch_size``: every rank gets ``batches_per_epoch`` batches and no pair twice in an epoch; global
    batch ``b`` is ``world_size`` consecutive slices of the permutation and rank ``r`` takes slice ``r``. The optional
    horizontal flip of a pair (the same for its winner and loser) is drawn from (seed, epoch, pair index).

    Batches: ``{"win", "lose": float32 [B, 3, H, W] in [-1, 1], "caption": list[str], "key": list[str],
    "index": list[int], "epoch": list[int]}`` (index: position in the dataset; epoch: the pass it belongs to). Any
    dataset with ``item(i, flip)``, ``collate(items)``, ``root`` and ``digest`` works (e.g. the latent cache,
    :class:`sdpo.train.cache.CachedPairDataset`, whose batches hold latents and embeddings instead of images).
    :meth:`state_dict` is the position of the NEXT batch to hand out (prefetched batches are not counted); after
    :meth:`load_state_dict` the next ``iter()`` starts right there. Use one iterator at a time.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        random_flip: bool = False,
        num_workers: int = 0,
        prefetch_factor: int = 2,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.random_flip = random_flip
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.batches_per_epoch = len(dataset) // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{dataset.root}: {len(dataset)} pairs are fewer than one global batch "
                f"(batch_size {batch_size} x world_size {world_size})"
            )
        self.epoch = 0
        self.batch = 0

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's pair indices for ``epoch`` as ``[batches_per_epoch, batch_size]``, and flips per pair index."""
        n = len(self.dataset)
        order = torch.randperm(n, generator=_generator(self.seed, epoch, "order")).numpy()
        global_batch = self.world_size * self.batch_size
        order = order[: self.batches_per_epoch * global_batch].reshape(self.batches_per_epoch, global_batch)
        mine = order[:, self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        flips = flip_plan(self.seed, epoch, n) if self.random_flip else np.zeros(n, dtype=bool)
        return mine, flips

    def epoch_of_batch(self, count: int) -> int:
        """The epoch of this rank's ``count``-th batch (0-based) counted from the start of training."""
        return count // self.batches_per_epoch

    def _advance(self) -> None:
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = self.num_workers
        loader = DataLoader(
            _PlacedView(self.dataset),
            batch_sampler=_CursorBatches(self, self.epoch, self.batch),
            collate_fn=self.dataset.collate,
            num_workers=workers,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )
        for batch in loader:
            if isinstance(batch, SampleFailure):
                raise DataError(batch.message)
            self._advance()
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The cursor: position of the next batch, and what it is only valid for."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_pairs": len(self.dataset),
            "dataset_digest": self.dataset.digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Jump to a saved cursor (no data is replayed); :class:`DataError` if it belongs to another setup."""
        for name, mine in (
            ("seed", self.seed),
            ("batch_size", self.batch_size),
            ("world_size", self.world_size),
            ("num_pairs", len(self.dataset)),
        ):
            if state.get(name) != mine:
                raise DataError(f"loader state: {name} is {state.get(name)!r} but this loader has {mine!r}")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise DataError(
                f"loader state: epoch {epoch}, batch {batch} out of range ({self.batches_per_epoch} per epoch)"
            )
        self.epoch, self.batch = epoch, batch


# --- streaming (multi-node) ---------------------------------------------------------------------------------


def _stream_pair(sample: dict[str, Any], seed: int, random_flip: bool, resolution: int | None) -> dict[str, Any]:
    names = _field_names([k for k in sample if not k.startswith("__")])
    key = sample["__key__"]
    where = f"{sample.get('__url__', '?')}: sample {key!r}"
    missing = [stem for stem in _FIELDS if stem not in names]
    if missing:
        raise DataError(f"{where}: no {', '.join(missing)} field")
    item = decode_pair({stem: sample[name] for stem, name in names.items()}, where, resolution)
    win, lose = item["win"], item["lose"]
    if random_flip and hashlib.sha256(f"{seed}:{key}".encode()).digest()[0] & 1:
        win, lose = np.ascontiguousarray(win[:, ::-1]), np.ascontiguousarray(lose[:, ::-1])
    return {"win": win, "lose": lose, "caption": item["caption"], "key": key, "meta": item["meta"]}


def webdataset_pipeline(
    urls: str | Path | Sequence[str],
    batch_size: int,
    seed: int,
    *,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    random_flip: bool = False,
    batches_per_epoch: int | None = None,
) -> wds.WebDataset:
    """Stream batches (same format as :class:`PairLoader`) from shards with WebDataset: the multi-node path.

    ``urls`` is a dataset folder (verified first; its manifest lists the shards), or shard paths/URLs (``pipe:``,
    ``s3://`` via gopen, brace patterns). Shards are split across ranks with ``wds.split_by_node`` and across
    DataLoader workers; with ``shuffle`` the shard order (deterministic from ``seed`` and the epoch) and a sample
    buffer are shuffled. Decode failures name the shard and key. Ranks may see different numbers of batches when
    shards are uneven, which hangs DDP: pass ``batches_per_epoch`` (repeats the stream and cuts every epoch to that
    many batches on each rank and worker). Wrap the result in ``wds.WebLoader(pipeline, batch_size=None,
    num_workers=K)`` for worker processes.
    """
    resolution = None
    if isinstance(urls, str | Path) and Path(urls).is_dir():
        manifest = verify_dataset(urls)  # a local dataset is verified like PairDataset's; URLs are streamed as given
        resolution = manifest["resolution"]
        urls = [str(Path(urls) / shard["name"]) for shard in manifest["shards"]]
    elif isinstance(urls, Path):
        urls = [str(urls)]
    pipeline = wds.WebDataset(
        urls,
        nodesplitter=wds.split_by_node,
        shardshuffle=100 if shuffle else False,
        detshuffle=True,
        seed=seed,
        empty_check=False,
    )
    if shuffle:
        pipeline = pipeline.shuffle(shuffle_buffer, seed=seed)
    pipeline = pipeline.map(functools.partial(_stream_pair, seed=seed, random_flip=random_flip, resolution=resolution))
    pipeline = pipeline.batched(batch_size, collation_fn=collate_pairs, partial=False)
    if batches_per_epoch is not None:
        pipeline = pipeline.with_epoch(nbatches=batches_per_epoch)  # repeats the stream as needed
    return pipeline


# --- arrays -------------------------------------------------------------------------------------------------


def load_pairs_arrays(shards_dir: str | Path, n: int | None = None) -> dict[str, Any]:
    """The first ``n`` pairs (all if None) as ``{"win", "lose": uint8 [N, H, W, 3], "caption", "key": lists}``."""
    dataset = PairDataset(shards_dir)
    count = len(dataset) if n is None else min(n, len(dataset))
    items = [dataset[i] for i in range(count)]
    resolution = dataset.manifest["resolution"]
    empty = np.zeros((0, resolution, resolution, 3), np.uint8)
    return {
        "win": np.stack([item["win"] for item in items]) if items else empty,
        "lose": np.stack([item["lose"] for item in items]) if items else empty.copy(),
        "caption": [item["caption"] for item in items],
        "key": [item["key"] for item in items],
    }
