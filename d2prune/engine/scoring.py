"""The batches a data-driven criterion scores on at a pruning event: drawn from the training set
by a sampler of their own, seeded by the run's seed and the event's index.

Independent of the training stream, so an event chooses the same channels whether or not the
run was resumed, and scoring never moves the training data on.
"""

import contextlib
import logging
import time
from typing import Callable, Iterator, List, Sequence

import torch
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.utils import comm

from ..utils.seeding import mix, seeded

__all__ = ["ScoringBatches"]


class ScoringBatches:
    """`batches(event)`: `num_batches` detectron2 training batches for pruning event `event`
    (0 for the first), this rank's share of `total_batch_size` images each.

    The images are a permutation of the dataset seeded by (`seed`, `event`), read in order and
    cycled when the dataset is smaller than the batches; rank r of n takes the r-th n-th of each
    batch, so the ranks together score `total_batch_size` distinct images per batch as training
    does. Each image is mapped (decoded, augmented) with the global random generators seeded by
    (`seed`, `event`, its position) and restored afterwards: the same images and augmentations
    on every run, and none of the training loader's random draws taken.

    `dataset` is called at each event (and only for data-driven criteria) for the list of
    dataset dicts, so nothing is held between events.
    """

    def __init__(
        self,
        dataset: Callable[[], Sequence[dict]],
        mapper: Callable[[dict], dict],
        total_batch_size: int,
        num_batches: int,
        seed: int = 0,
    ):
        self.dataset = dataset
        self.mapper = mapper
        self.total_batch_size = total_batch_size
        self.num_batches = num_batches
        # A run without a seed (SEED < 0) still scores the same images on every rank.
        self.seed = max(seed, 0)
        self.build_seconds = 0.0  # of the last event's dataset and permutation, for the log

    @classmethod
    def from_config(cls, cfg) -> "ScoringBatches":
        """For a yacs config: DATASETS.TRAIN as detectron2's training loader reads it, its
        default mapper (`DatasetMapper(cfg, True)`), SOLVER.IMS_PER_BATCH images per batch,
        PRUNE.SCORE_BATCHES batches, SEED."""

        def dataset():
            return get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN,
                filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
                proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
            )

        return cls(dataset, DatasetMapper(cfg, True), cfg.SOLVER.IMS_PER_BATCH, cfg.PRUNE.SCORE_BATCHES, cfg.SEED)

    def __call__(self, event: int) -> Iterator[List[dict]]:
        start = time.perf_counter()
        with _quiet("detectron2.data"):  # the training loader has logged the dataset once
            dicts = self.dataset()
        world, rank = comm.get_world_size(), comm.get_rank()
        if self.total_batch_size % world:
            raise ValueError(f"{self.total_batch_size} images per batch do not split over {world} processes")
        per_rank = self.total_batch_size // world
        order = _cycled_permutation(len(dicts), self.num_batches * self.total_batch_size, self.seed, event)
        self.build_seconds = time.perf_counter() - start
        for b in range(self.num_batches):
            first = b * self.total_batch_size + rank * per_rank
            batch = []
            for position in range(first, first + per_rank):
                with seeded(self.seed, event, position):
                    batch.append(self.mapper(dict(dicts[order[position]])))
            yield batch


def _cycled_permutation(size: int, length: int, seed: int, event: int) -> List[int]:
    """`length` dataset indices: seeded permutations of range(size), one after another."""
    if size == 0:
        raise ValueError("no training images to score channels on")
    generator = torch.Generator().manual_seed(mix(seed, event))
    order: List[int] = []
    while len(order) < length:
        order.extend(torch.randperm(size, generator=generator).tolist())
    return order[:length]


@contextlib.contextmanager
def _quiet(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
