"""The training data stream, resumable at any iteration: a run killed and resumed trains on the
same batches, with the same augmentations, as a run that was never interrupted.

Detectron2's training loader restarts its sampler when a run resumes (the data order starts over)
and its workers reseed from the main process's generator (the augmentations change). Here every
sample has a *position* in this rank's stream (0, 1, 2, ...):
- the sampler's index at that position comes from the seeded, rank-sharded infinite sampler that
  detectron2 uses (`TrainingSampler`, `RepeatFactorTrainingSampler`), so it is known without
  reading anything;
- the sample is mapped (decoded, augmented) with the random generators seeded by (seed, rank,
  position), so its augmentation is a function of where it sits in the stream, not of which
  worker ran it or what ran before;
- the aspect-ratio grouping (detectron2's: images wider than tall in one bucket, the others in
  another, a batch when a bucket is full) groups by the dataset dict's width and height, so the
  state of the buckets after any number of batches can be replayed from the dataset alone.

`TrainStream.seek(iteration)` replays the grouping up to `iteration` batches and starts the
stream with the samples the buckets held then, followed by the first position not yet read.
"""

import copy
import itertools
import logging
import random
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UserError
from ..utils.seeding import mix, seeded

__all__ = ["TrainStream", "build_train_stream", "build_sampler"]

logger = logging.getLogger(__name__)

# A mapper may return None for a sample it cannot use (detectron2's MapDataset then tries another
# one); the stream tries this many others, chosen by a generator seeded from the position.
_MAX_RETRIES = 10


class TrainStream:
    """An iterable of training batches (lists of mapped dataset dicts, `batch_size` each) that
    can start at any iteration with `seek` and gives the same batches there as a stream read
    from the start.

    Args:
        dataset: indexable dataset dicts (a list, or detectron2's `DatasetFromList`).
        mapper: turns a dataset dict into the model's input (e.g. `DatasetMapper(cfg, True)`).
        sampler: an infinite iterable of dataset indices for this rank, seeded, that starts over
            identically on every `iter()` (detectron2's training samplers are such).
        batch_size: images per batch on this rank.
        aspect_ratio_grouping: batch wide and tall images apart, as detectron2 does.
        num_workers: data-loading processes (0: map in this process).
        seed, rank: the key of every sample's augmentation generators, with its position.
    """

    def __init__(
        self,
        dataset: Sequence[dict],
        mapper: Callable[[dict], Optional[dict]],
        sampler: Iterable[int],
        batch_size: int,
        *,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(dataset) == 0:
            raise UserError("the training datasets hold no images")
        self.dataset, self.mapper, self.sampler = dataset, mapper, sampler
        self.batch_size = batch_size
        self.grouping = aspect_ratio_grouping
        self.num_workers = num_workers
        self.seed, self.rank = seed, rank
        self.start_iter = 0
        self._started = False
        self._buckets = _bucket_keys(dataset) if aspect_ratio_grouping else None

    def seek(self, iteration: int) -> None:
        """Start the stream at batch `iteration` (the first batch is 0). Only before the stream is
        read: an iterator made earlier starts at the position that holds when it is first read."""
        if self._started:
            raise RuntimeError("TrainStream.seek after the stream was read; seek before training starts")
        self.start_iter = int(iteration)

    def __iter__(self) -> Iterator[List[dict]]:
        # A generator: nothing happens until the first batch is asked for, so that a trainer
        # may create its iterator before the checkpoint it resumes from says where to start.
        self._started = True
        pending, following = self.replay(self.start_iter)
        order = itertools.chain(pending, itertools.count(following))
        if self.start_iter:
            logger.info(
                "Training data resumes at batch %d (sample %d of this rank's stream, %d held back by "
                "the aspect-ratio grouping)", self.start_iter, following, len(pending),
            )  # fmt: skip
        samples = _MappedPositions(self, order)
        if self.num_workers > 0:
            samples = DataLoader(
                samples, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                # A generator of its own: making the iterator draws a base seed from it, which
                # would otherwise move the global generator that training draws from.
                generator=torch.Generator().manual_seed(mix(self.seed, self.rank)),
                persistent_workers=False,
            )  # fmt: skip
        yield from self._batches(samples, pending, following)

    def _batches(self, samples: Iterable[Tuple[int, dict]], pending: List[int], following: int) -> Iterator[List[dict]]:
        expected = itertools.chain(pending, itertools.count(following))
        indices = _IndexCursor(self.sampler)  # this process's own: the bucket is chosen here
        buckets: List[List[dict]] = [[], []]
        for (position, sample), want in zip(samples, expected):
            if position != want:  # the loader's workers are read in turn, so never
                raise RuntimeError(f"training stream out of order: sample {position} where {want} was due")
            bucket = buckets[self._buckets[indices.index_at(position)] if self._buckets is not None else 0]
            bucket.append(sample)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                del bucket[:]

    def replay(self, iteration: int) -> Tuple[List[int], int]:
        """The stream's state after `iteration` batches: the positions the buckets then hold (in
        order) and the first position not yet read."""
        if not self.grouping:
            return [], iteration * self.batch_size
        buckets: List[List[int]] = [[], []]
        done, position = 0, 0
        indices = iter(self.sampler)
        while done < iteration:
            bucket = buckets[self._buckets[next(indices)]]
            bucket.append(position)
            position += 1
            if len(bucket) == self.batch_size:
                del bucket[:]
                done += 1
        return sorted(buckets[0] + buckets[1]), position

    def map(self, position: int, index: int) -> dict:
        """The sample at `position` (dataset index `index`), mapped with generators seeded by
        (seed, rank, position); a sample the mapper refuses (None) is replaced by others drawn by
        a generator seeded the same way."""
        chooser = None  # made only for a refused sample: most never need one
        for attempt in range(_MAX_RETRIES + 1):
            with seeded(self.seed, self.rank, position, 0, attempt):
                sample = self.mapper(copy.deepcopy(self.dataset[index]))
            if sample is not None:
                return sample
            chooser = chooser or random.Random(mix(self.seed, self.rank, position, 1))
            index = chooser.randrange(len(self.dataset))
        raise UserError(f"the data mapper returned no sample for {_MAX_RETRIES + 1} dataset images in a row")


class _IndexCursor:
    """Dataset indices by stream position, read forward from one sampler iterator; positions
    asked for must not decrease (earlier ones are forgotten)."""

    def __init__(self, sampler: Iterable[int]):
        self._indices = iter(sampler)
        self._position = -1
        self._index = None

    def index_at(self, position: int) -> int:
        if position < self._position:
            raise RuntimeError(f"stream position {position} asked after {self._position}")
        while self._position < position:
            self._index = next(self._indices)
            self._position += 1
        return self._index


class _MappedPositions(IterableDataset):
    """(position, mapped sample) for the positions of `order`; in a loader's worker w of n, the
    w-th, (w+n)-th, ... of them, which the loader reads back in turn, so in order."""

    def __init__(self, stream: TrainStream, order: Iterator[int]):
        self.stream, self.order = stream, order

    def __iter__(self) -> Iterator[Tuple[int, dict]]:
        worker = get_worker_info()
        order = self.order if worker is None else itertools.islice(self.order, worker.id, None, worker.num_workers)
        cursor = _IndexCursor(self.stream.sampler)
        for position in order:
            yield position, self.stream.map(position, cursor.index_at(position))


def _identity(sample):
    return sample


def _bucket_keys(dataset: Sequence[dict]) -> np.ndarray:
    """0 for each image wider than tall, 1 for the others (detectron2's two aspect groups)."""
    keys = np.empty(len(dataset), dtype=np.int8)
    for i in range(len(dataset)):
        d = dataset[i]
        try:
            keys[i] = 0 if d["width"] > d["height"] else 1
        except KeyError:
            raise UserError(
                "DATALOADER.ASPECT_RATIO_GROUPING needs the width and height of every training image "
                f"in its dataset dict; {d.get('file_name', f'image {i}')} has none"
            ) from None
    return keys


def build_sampler(cfg, dataset: Sequence[dict], seed: int):
    """The training sampler that DATALOADER.SAMPLER_TRAIN names, seeded with `seed` (the same on
    every rank, so that the ranks share one shuffled stream, each its own part)."""
    from detectron2.data import samplers

    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return samplers.TrainingSampler(len(dataset), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = samplers.RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset, cfg.DATALOADER.REPEAT_THRESHOLD
        )
        return samplers.RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler" and hasattr(samplers, name):
        return samplers.RandomSubsetTrainingSampler(
            len(dataset), cfg.DATALOADER.RANDOM_SUBSET_RATIO, seed_shuffle=seed, seed_subset=seed
        )
    known = ["TrainingSampler", "RepeatFactorTrainingSampler"] + (
        ["RandomSubsetTrainingSampler"] if hasattr(samplers, "RandomSubsetTrainingSampler") else []
    )
    raise UserError(f"DATALOADER.SAMPLER_TRAIN {name!r} is not one of {', '.join(known)}")


def build_train_stream(cfg, seed: int, mapper: Optional[Callable[[dict], Optional[dict]]] = None) -> TrainStream:
    """The resumable training stream for a yacs config, reading what detectron2's
    `build_detection_train_loader(cfg)` reads: DATASETS.TRAIN with its filters, `mapper`
    (default `DatasetMapper(cfg, True)`), DATALOADER.SAMPLER_TRAIN, SOLVER.IMS_PER_BATCH split
    over the processes, DATALOADER.ASPECT_RATIO_GROUPING and NUM_WORKERS."""
    from detectron2.data import DatasetFromList, DatasetMapper, get_detection_dataset_dicts
    from detectron2.utils import comm

    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    sampler = build_sampler(cfg, dicts, seed)
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:  # check_run says this in one line before any process starts
        raise UserError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} does not split over {world} processes")
    return TrainStream(
        # Serialised, as detectron2's loader holds them, so workers do not copy the dicts.
        DatasetFromList(dicts, copy=False, serialize=True),
        DatasetMapper(cfg, True) if mapper is None else mapper,
        sampler,
        cfg.SOLVER.IMS_PER_BATCH // world,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        seed=seed,
        rank=comm.get_rank(),
    )
