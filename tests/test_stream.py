"""The resumable training stream: started at any batch, it gives the batches a stream read from
the start gives there, with the same augmentations, grouped by aspect ratio, with or without
worker processes."""

import itertools
import random

import numpy as np
import pytest
import torch

from d2prune.data.stream import TrainStream
from d2prune.errors import UserError


class _Sampler:
    """An infinite seeded shuffle, restarted identically on every iter() (as detectron2's)."""

    def __init__(self, size, seed):
        self.size, self.seed = size, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.size, generator=g).tolist()


def _dataset(n=11, seed=0):
    rng = random.Random(seed)
    return [{"image_id": i, "width": rng.choice([40, 60]), "height": rng.choice([40, 60, 50])} for i in range(n)]


def _mapper(d):
    # What an augmentation draws, from each of the three global generators.
    return {
        "image_id": d["image_id"],
        "wide": d["width"] > d["height"],
        "draws": (random.random(), float(np.random.rand()), float(torch.rand(()))),
    }


def _stream(dataset, mapper=_mapper, **kwargs):
    options = dict(batch_size=3, aspect_ratio_grouping=True, num_workers=0, seed=7, rank=0)
    options.update(kwargs)
    return TrainStream(dataset, mapper, _Sampler(len(dataset), seed=3), **options)


def _read(stream, start, count):
    if start:
        stream.seek(start)
    return list(itertools.islice(iter(stream), count))


@pytest.mark.parametrize("grouping", [True, False], ids=["grouped", "ungrouped"])
def test_a_stream_started_at_any_batch_gives_the_batches_read_from_the_start(grouping):
    dataset = _dataset()
    whole = _read(_stream(dataset, aspect_ratio_grouping=grouping), 0, 20)
    if grouping:  # the buckets really hold images back between batches, and group by shape
        assert all(len({s["wide"] for s in batch}) == 1 for batch in whole)
        read = [s["image_id"] for batch in whole for s in batch]
        sampled = list(itertools.islice(iter(_Sampler(len(dataset), seed=3)), len(read)))
        assert read != sampled  # held back: grouping reorders what the sampler gives
    for start in (1, 2, 5, 13):
        assert _read(_stream(dataset, aspect_ratio_grouping=grouping), start, 20 - start) == whole[start:]


def test_the_stream_depends_on_its_seed_and_rank_only():
    dataset = _dataset()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    first = _read(_stream(dataset), 0, 4)
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    state = torch.random.get_rng_state()
    assert _read(_stream(dataset), 0, 4) == first
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator untouched
    assert _read(_stream(dataset, seed=8), 0, 4) != first
    assert _read(_stream(dataset, rank=1), 0, 4) != first


def test_the_replay_knows_which_images_the_grouping_holds_back():
    dataset = [{"image_id": i, "width": 60 if i % 3 else 40, "height": 50} for i in range(9)]
    stream = _stream(dataset)
    whole = _read(_stream(dataset), 0, 10)
    held_back = 0
    for k in range(1, 11):
        pending, following = stream.replay(k)
        sampled = list(itertools.islice(iter(_Sampler(len(dataset), seed=3)), following))
        used = sorted(s["image_id"] for batch in whole[:k] for s in batch)
        # Read so far = what the first k batches used + what the buckets hold.
        assert sorted(used + [sampled[p] for p in pending]) == sorted(sampled)
        held_back += len(pending)
    assert held_back > 0
    assert stream.replay(0) == ([], 0)


@pytest.mark.slow
def test_workers_give_the_same_stream_as_the_main_process():
    dataset = _dataset(n=13)
    alone = _read(_stream(dataset), 0, 9)
    assert _read(_stream(dataset, num_workers=2), 0, 9) == alone
    assert _read(_stream(dataset, num_workers=2), 4, 5) == alone[4:]


def test_a_refused_sample_is_replaced_the_same_way_every_time():
    dataset = _dataset()

    def picky(d):
        return None if d["image_id"] % 4 == 0 else _mapper(d)

    whole = _read(_stream(dataset, mapper=picky), 0, 8)
    assert all(s["image_id"] % 4 for batch in whole for s in batch)
    assert _read(_stream(dataset, mapper=picky), 3, 5) == whole[3:]
    with pytest.raises(UserError, match="returned no sample"):
        _read(_stream(dataset, mapper=lambda d: None), 0, 1)


def test_seeking_after_reading_is_refused():
    stream = _stream(_dataset())
    next(iter(stream))
    with pytest.raises(RuntimeError, match="seek"):
        stream.seek(3)


def test_grouping_needs_image_sizes():
    with pytest.raises(UserError, match="width and height.*a.png"):
        _stream([{"file_name": "a.png"}])
