"""Information-theoretic criteria: how much a channel's response varies over images (entropy) and
how much it tells about the detection target at each position of its map (mi, optionally mRMR).
"""

import contextlib
import math
from typing import Iterator, List, Optional, Tuple

import torch
from detectron2.utils import comm
from torch import nn

from .. import compat
from ..errors import UserError
from ..pruning.groups import ChannelGroup
from . import register
from .collector import Accumulator, StatisticsCriterion, samples
from .targets import image_positions, position_labels

__all__ = ["Entropy", "MutualInformation", "mutual_information", "class_information"]

# Elements of a (channels x positions) block binned and counted at once (32 MiB of int32 cell
# indices), so that a high-resolution map never needs a copy several times its size.
_CHUNK_ELEMENTS = 2**23
# Positions whose quantiles set a channel's bin edges: the j/B quantiles to within about 1/100.
_QUANTILE_SAMPLES = 4096


def _entropy(counts: torch.Tensor, dim: int) -> torch.Tensor:
    """Plug-in entropy in nats of the count tables along `dim` (0 for an empty table)."""
    p = counts / counts.sum(dim, keepdim=True).clamp(min=1)
    return -torch.special.xlogy(p, p).sum(dim)


def mutual_information(joint: torch.Tensor) -> torch.Tensor:
    """Miller-Madow corrected I(X; Y) in nats from count tables `joint[..., x, y]`.

    The plug-in estimate I = sum p_xy log(p_xy / (p_x p_y)) of n samples overstates I by
    about (m_x - 1)(m_y - 1) / 2n for independent X and Y, m being the number of occupied
    bins. Miller (1955, "Note on the bias of information estimates") adds (m - 1) / 2n to each
    plug-in entropy of I = H(X) + H(Y) - H(X, Y), which gives I + (m_x + m_y - m_xy - 1) / 2n.
    The correction removes the first-order bias, so small positive and negative values both
    mean "no information": the estimate is not clamped at zero. A table with one occupied row
    or column (a constant channel) gives exactly 0, and so does an empty one.
    """
    joint = joint.double()
    rows, cols = joint.sum(-1, keepdim=True), joint.sum(-2, keepdim=True)
    total = rows.sum((-2, -1))
    n = total.clamp(min=1)
    # n_xy n / (n_x n_y) is exactly 1 where X or Y has a single value.
    ratio = torch.where(joint > 0, joint * n[..., None, None] / (rows * cols), 1.0)
    plug_in = torch.special.xlogy(joint, ratio).sum((-2, -1)) / n
    occupied = (rows > 0).sum((-2, -1)) + (cols > 0).sum((-2, -1)) - (joint > 0).sum((-2, -1)) - 1
    return torch.where(total > 0, plug_in + occupied / (2 * n), 0.0)


def class_information(joint: torch.Tensor) -> torch.Tensor:
    """(K, C): for each class k, I(binned a_c; [Y = k]) of each channel c, from the (C, B, K + 1)
    counts of `mi` (label 0 background, k + 1 class k): what channel c says about "class k
    here, or anything else", Miller-Madow corrected like `mutual_information`."""
    total = joint.sum(-1)
    objects = joint[..., 1:].movedim(-1, 0)  # (K, C, B)
    return mutual_information(torch.stack([objects, total - objects], -1))


def _positive_int(criterion: str, key: str, value, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"criterion '{criterion}': {key} must be an integer >= {least}, got {value!r}.")
    return value


class _PooledValues(Accumulator):
    """The first `images` pooled activations (one value per channel and image) of all processes.

    Each rank writes into its own block of rows, so the collector's all-reduced sum is the
    concatenation of every rank's values, and all ranks build the same histogram.
    """

    def __init__(self, module: nn.Module, size: int, bins: int, images: int):
        super().__init__(module, size)
        self.bins = bins
        world, self.rank = comm.get_world_size(), comm.get_rank()
        self.block = -(-images // world)
        self.filled = 0
        self.sums.update(values=self.zeros(world * self.block, size), filled=self.zeros(world))
        # This batch's sums over positions and the positions, per call size: calls with the same
        # number of samples are the pyramid levels of the same images (the RPN head), which an
        # image's average pools together.
        self.batch = {}

    def update(self, a, grad=None):
        a = samples(a)
        entry = self.batch.setdefault(a.shape[0], [0.0, 0])
        entry[0] = entry[0] + a.sum(2, dtype=torch.float64)
        entry[1] += a.shape[2]

    def end_batch(self, grads=()):
        for total, positions in self.batch.values():
            pooled = (total / positions)[: self.block - self.filled]
            start = self.rank * self.block + self.filled
            self.sums["values"][start : start + len(pooled)] = pooled
            self.filled += len(pooled)
        self.sums["filled"][self.rank] = self.filled
        self.batch.clear()

    def result(self):
        rows = [
            self.sums["values"][r * self.block : r * self.block + int(n)]
            for r, n in enumerate(self.sums["filled"].tolist())
        ]
        values = torch.cat(rows).T  # (C, images)
        if values.shape[1] == 0:
            return self.zeros(self.size)
        low, high = values.aminmax(dim=1, keepdim=True)
        width = (high - low).clamp(min=torch.finfo(values.dtype).tiny)
        index = ((values - low) / width * self.bins).long().clamp(max=self.bins - 1)
        counts = self.zeros(self.size, self.bins).scatter_add_(1, index, torch.ones_like(values))
        return _entropy(counts, 1)


@register("entropy")
class Entropy(StatisticsCriterion):
    """Luo & Wu 2017, "An Entropy-based Pruning Method for CNN Compression":
    H_c = - sum_i p_i log p_i over the `bins` bins of channel c's pooled activations.

    Each image's map of channel c is averaged to one value (global average pooling over all
    pyramid levels of a head shared across levels; for the box head's Linear layers a sample is
    a proposal, one value each); the values of the first `images` samples (split evenly over
    the processes) are binned in `bins` equal bins from their minimum to their maximum. A
    channel whose response hardly changes from image to image carries little information and
    is pruned first; a constant one scores 0. Activations are the producer's output as the
    collector records it, before the block's ReLU. Keeping the values, not a histogram, lets
    the bins span their true range: the memory is images x channels x 8 bytes (256 x the 31k
    producer channels of an R50-FPN: 63 MB).
    """

    def __init__(self, bins: int = 16, images: int = 256):
        self.bins = _positive_int("entropy", "bins", bins, 2)
        self.images = _positive_int("entropy", "images", images)

    def accumulator(self, module: nn.Module, group: ChannelGroup) -> Accumulator:
        return _PooledValues(module, group.size, self.bins, self.images)


class _Targets:
    """The detection target of every sample a producer outputs in the current batch, shared by
    the accumulators of one `mi` collection: labels 0 (background) or k + 1 (class k)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.batch: Optional[List[dict]] = None
        self.padded = (0, 0)
        self.maps = {}
        self.proposals: Optional[torch.Tensor] = None

    def begin(self, batch: List[dict], padded: Tuple[int, int]) -> None:
        if batch is not self.batch:
            self.batch, self.padded, self.maps, self.proposals = batch, padded, {}, None

    def positions(self, a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """An image-level map (N, C, h, w) as (C, P) values and (P,) labels of the positions
        that lie inside their image (padding positions are no image's and left out)."""
        n, c, h, w = a.shape
        if (h, w) not in self.maps:
            labels = position_labels(self.batch, (h, w), self.padded).flatten()
            inside = image_positions(self.batch, (h, w), self.padded).flatten()
            labels = labels[inside].int().to(a.device)
            self.maps[h, w] = labels, None if inside.all() else inside.to(a.device)
        labels, inside = self.maps[h, w]
        x = a.transpose(0, 1).reshape(c, n * h * w)
        return (x if inside is None else x[:, inside]), labels

    def rows(self, a: torch.Tensor, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """A region-level output (R, C) or (R, C, h, w) of the box or mask head as (C, P) values
        and (P,) labels: every position of a region takes its proposal's assigned class."""
        if self.proposals is None:
            raise RuntimeError(f"{name} ran before roi_heads.label_and_sample_proposals in this batch")
        labels = self.proposals
        if len(a) != len(labels):  # the mask head sees the foreground proposals only
            labels = labels[labels > 0]
        if len(a) != len(labels):
            raise RuntimeError(
                f"the {len(a)} rows of {name} are neither the {len(self.proposals)} sampled "
                f"proposals nor the {len(labels)} foreground ones"
            )
        a = samples(a)
        return a.transpose(0, 1).reshape(a.shape[1], -1), labels.int().repeat_interleave(a.shape[2])


class _TargetInformation(Accumulator):
    """Counts (C, B, K + 1) of (channel c's bin, target) over every position of every map the
    producer outputs, and for `redundancy` the sums of a and a a^T over the same positions."""

    def __init__(self, module, size, name, targets: _Targets, bins: int, roi: bool, redundancy: float):
        super().__init__(module, size)
        self.name, self.targets, self.bins, self.roi = name, targets, bins, roi
        self.redundancy_weight = redundancy
        self.edges: Optional[torch.Tensor] = None
        self.sums["joint"] = self.zeros(size, bins, targets.num_classes + 1)
        if redundancy:
            self.sums.update(first=self.zeros(size), second=self.zeros(size, size), count=self.zeros(1))

    def begin_batch(self, batch, padded_size):
        self.targets.begin(batch, padded_size)

    def update(self, a, grad=None):
        x, y = self.targets.rows(a, self.name) if self.roi else self.targets.positions(a)
        x = x.float()
        if self.edges is None:
            self.edges = self._shared_edges(x)
            if self.edges is None:  # no process has seen a sample yet
                return
        joint = self.sums["joint"]
        classes = joint.shape[-1]
        # Channel c, bin b, label y counts in cell (c B + b) (K + 1) + y of the flat table.
        offset = torch.arange(self.size, dtype=torch.int32, device=x.device)[:, None] * (self.bins * classes)
        for xs, ys in self._chunks(x, y):
            cell = torch.searchsorted(self.edges, xs, out_int32=True).mul_(classes).add_(ys).add_(offset)
            joint += torch.bincount(cell.flatten(), minlength=joint.numel()).view_as(joint)
        if self.redundancy_weight:
            for xs, _ in self._chunks(x, y):
                xs = xs.double()
                self.sums["first"] += xs.sum(1)
                self.sums["second"] += xs @ xs.T
            self.sums["count"] += x.shape[1]

    def _chunks(self, x: torch.Tensor, y: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        step = max(1, _CHUNK_ELEMENTS // max(self.size, 1))
        for start in range(0, x.shape[1], step):
            yield x[:, start : start + step].contiguous(), y[start : start + step]

    def _shared_edges(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Equal-frequency bin edges (C, B - 1): the j/B quantiles of each channel's values in
        this first call (of at most 4096 positions of it, drawn with a fixed seed), averaged
        over the processes that had values, so that every rank bins alike and the counts add up."""
        positions = x.shape[1]
        edges = torch.zeros(self.size, self.bins - 1, dtype=torch.float64, device=x.device)
        if positions:
            if positions > _QUANTILE_SAMPLES:
                generator = torch.Generator().manual_seed(0)
                x = x[:, torch.randint(positions, (_QUANTILE_SAMPLES,), generator=generator).to(x.device)]
            ordered = x.sort(1).values
            q = torch.arange(1, self.bins, device=x.device) / self.bins
            edges = ordered[:, (q * (ordered.shape[1] - 1)).round().long()].double()
        seen = torch.tensor([float(positions > 0)], dtype=torch.float64, device=x.device)
        if comm.get_world_size() > 1:
            shared = torch.cat([edges.flatten() * seen, seen])
            torch.distributed.all_reduce(shared)
            edges, seen = shared[:-1].view_as(edges), shared[-1:]
        if seen.item() == 0:
            return None
        # The mean of sorted edges is sorted; float32 to search the float32 activations.
        return (edges / seen).float().contiguous()

    def relevance(self) -> torch.Tensor:
        """I(a_c; Y) in nats, Miller-Madow corrected."""
        return mutual_information(self.sums["joint"])

    def redundancy(self) -> torch.Tensor:
        """Mean over the producer's other channels j of the Gaussian I(a_c; a_j) in nats."""
        n = self.sums["count"].clamp(min=1)
        mean = self.sums["first"] / n
        second = self.sums["second"] / n
        rho = second - mean[:, None] * mean[None, :]  # the covariance, in place from here
        var = rho.diagonal().clone()
        # A constant channel's variance is rounding noise of E[a^2] - E[a]^2: it shares nothing.
        varies = var > 1e-10 * second.diagonal().abs()
        scale = torch.where(varies, var.clamp(min=torch.finfo(var.dtype).tiny).rsqrt(), 0.0)
        rho.mul_(scale[:, None]).mul_(scale[None, :])
        # No more than log B: what a channel binned into B values can share with another.
        pairwise = rho.square_().clamp_(max=1 - self.bins**-2).neg_().log1p_().mul_(-0.5)
        pairwise.fill_diagonal_(0.0)
        return pairwise.sum(1) / max(self.size - 1, 1)

    def result(self):
        score = self.relevance()
        if self.redundancy_weight:
            score = score - self.redundancy_weight * self.redundancy()
        return score


@register("mi")
class MutualInformation(StatisticsCriterion):
    """I(a_c; Y): the mutual information between channel c's activation at a position of its
    map and the detection target Y there, from images with ground truth.

    Y is 0 for background and k + 1 where an object of class k covers the position
    (`targets.position_labels`: the smallest ground-truth box that contains the position's
    centre, at the map's stride). Every position inside the image counts, on every pyramid
    level for heads shared across levels; for the box head's Linear layers (and the mask head
    and C4 res5, whose maps are regions) a row is a sampled proposal and takes the class that
    `roi_heads.label_and_sample_proposals` assigned it (0 for background proposals), recorded
    while statistics are collected. No gradients are needed, so no backward pass runs.

    Estimator: a joint histogram of counts (channels x `bins` x (K + 1)), summed over batches
    and processes, and `mutual_information` (plug-in with the Miller-Madow bias correction).
    Each channel's bins are equal-frequency, their edges the quantiles of the producer's first
    output (its first pyramid level), averaged over the processes, so that every rank bins the
    same way; mutual information does not change under monotone transforms of a_c, so
    quantile bins lose least of it for a given B. Background dominates the positions and is
    simply part of Y: H(Y) is small when objects are rare, but every channel of a producer is
    measured against the same Y, and scores are compared within a producer (`combine`
    normalises them), so the scale does not matter. Weighting positions to balance the
    classes would score channels for an object frequency the detector never sees, and would
    break the multinomial counts that the bias correction assumes.

    `mi_redundancy` = lambda > 0 gives the mRMR score of Peng, Long & Ding 2005 ("Feature
    selection based on mutual information: criteria of max-dependency, max-relevance, and
    min-redundancy"), s_c = I(a_c; Y) - lambda * mean_{j != c} I(a_c; a_j) over the producer's
    other channels j. The pairwise terms use the Gaussian formula -1/2 log(1 - rho_cj^2) from
    running sums of a and a a^T (a C x C matrix of float64 sums per producer), capped at
    log B, the most a channel binned into B values can carry; constant channels share
    nothing. A channel that duplicates others scores lower than its relevance alone. Both terms
    are in nats, but the pairwise ones see the continuous values and run larger than the binned
    relevance: with lambda = 1, informative channels that correlate with many others can fall
    below a channel of pure noise, which lambda <= 0.5 avoided on a random-weight R18-FPN.
    """

    data = "targets"

    def __init__(self, bins: int = 16, mi_redundancy: float = 0.0):
        self.bins = _positive_int("mi", "bins", bins, 2)
        if isinstance(mi_redundancy, bool) or not isinstance(mi_redundancy, (int, float)) or not (
            0 <= mi_redundancy < math.inf
        ):
            raise UserError(
                f"criterion 'mi': mi_redundancy must be a number >= 0, got {mi_redundancy!r}."
            )
        self.mi_redundancy = float(mi_redundancy)
        self.targets: Optional[_Targets] = None
        self.regions = set()
        self.names = {}

    def prepare(self, detector: nn.Module) -> None:
        heads = getattr(detector, "roi_heads", None)
        classes = getattr(heads, "num_classes", None) or getattr(detector, "num_classes", None)
        if not classes:
            raise UserError(
                f"criterion 'mi': {type(detector).__name__} has no roi_heads.num_classes or "
                "num_classes; it needs a detector with classes (Faster/Mask R-CNN, RetinaNet)."
            )
        self.targets = _Targets(int(classes))
        self.regions = {id(m) for m in heads.modules()} if heads is not None else set()
        self.names = {id(m): name for name, m in detector.named_modules()}

    def accumulator(self, module: nn.Module, group: ChannelGroup) -> Accumulator:
        return _TargetInformation(
            module, group.size, self.names.get(id(module), group.name), self.targets, self.bins,
            roi=id(module) in self.regions, redundancy=self.mi_redundancy,
        )

    def instrument(self, detector: nn.Module):
        """Record the classes `roi_heads.label_and_sample_proposals` assigns to the sampled
        proposals of each batch, which label the rows of the box and mask heads."""
        heads = getattr(detector, "roi_heads", None)
        if heads is None:
            return contextlib.nullcontext()
        targets = self.targets

        def observe(proposals):
            classes = torch.cat([p.gt_classes for p in proposals])
            # detectron2 marks background proposals with num_classes.
            targets.proposals = torch.where(
                (classes >= 0) & (classes < targets.num_classes), classes + 1, 0
            )

        return compat.observe_proposal_sampling(heads, observe)
