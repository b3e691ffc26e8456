"""Discovery of coupled channel groups: a union-find over channel spaces, filled in by rules.

The coupling rules of detectron2's modules live in `rules/`, one per module type; this file walks
them over a model, refuses layers no rule accounts for, and assembles the groups.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

from torch import nn

from ..errors import UserError
from ..utils.modules import unwrap
from .kinds import Kind
from .rules import rule_for
from .rules.layers import is_layer, is_norm

__all__ = ["ChannelGroup", "GroupBuilder", "find_groups", "unwrap"]

# When an identity shortcut or a grouped conv joins two channel spaces, the merged group takes
# the name and kind of the member with the highest rank (ties: the one discovered first), so a
# residual stream that the stem feeds directly is still reported as that stage's stream.
_KIND_RANK = {Kind.STEM: 0, Kind.BLOCK: 1, Kind.HEAD: 1, Kind.STAGE: 2, Kind.FPN: 3}


@dataclass
class ChannelGroup:
    """Channels that are kept or removed together, and the modules that write and read them.

    `producers` write the group as their output channels (a detectron2 `Conv2d`'s own `.norm`
    goes with its conv); `consumers` read it as their input channels (a `Linear` that reads a
    flattened C x H x W map reads each channel `in_features // size` times); `norms` are norm
    layers that are separate modules (RetinaNet's subnets). `unit` is the number of consecutive
    channels that must be kept or removed as a whole: channels per GroupNorm group or per
    conv group (ResNeXt), 1 otherwise. `kind` is a `Kind` value, as a plain string.
    """

    name: str
    kind: str
    size: int
    producers: List[str]
    consumers: List[str]
    norms: List[str] = field(default_factory=list)
    unit: int = 1


def find_groups(model: nn.Module) -> List[ChannelGroup]:
    """Every channel group of a Detectron2 ResNet/FPN detector, in forward order.

    Supports GeneralizedRCNN (Faster/Mask R-CNN, FPN or C4) and RetinaNet on ResNet/ResNeXt
    backbones, and modules with a registered rule; any other layer that carries channels is
    reported as unsupported.
    """
    return GroupBuilder(unwrap(model)).build()


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _gn_unit(norm: Optional[nn.Module]) -> int:
    return norm.num_channels // norm.num_groups if isinstance(norm, nn.GroupNorm) else 1


class GroupBuilder:
    """Union-find over channel spaces: each rule adds a space or ties two spaces together.

    What rules use: `names` (module -> name in the model), `model`, and the methods in the first
    two sections below.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.parent: List[int] = []
        self.labels: List[tuple] = []  # (name, kind) of each space as created
        self.members: List[tuple] = []  # (space, role, module)

    # -- the union-find ---------------------------------------------------------------------

    def space(self, name: str, kind: Kind) -> int:
        """A new channel space; if it ends up a group of its own, it has this name and kind."""
        self.parent.append(len(self.parent))
        self.labels.append((name, kind))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def merge(self, a: int, b: int) -> None:
        """Spaces `a` and `b` are the same channels (added together, or read by shared weights)."""
        ra, rb = self.find(a), self.find(b)
        self.parent[max(ra, rb)] = min(ra, rb)

    def produce(self, s: int, module: nn.Module) -> None:
        """`module` (a conv or linear layer, with its own `.norm` if any) writes space `s`."""
        if not is_layer(module):
            self.unsupported(module)
        norm = getattr(module, "norm", None)
        if norm is not None and not is_norm(norm):
            self.unsupported(norm)
        self.members.append((s, "producers", module))

    def consume(self, s: int, module: nn.Module) -> None:
        """`module` (a conv or linear layer) reads space `s` as its input channels."""
        if not is_layer(module):
            self.unsupported(module)
        self.members.append((s, "consumers", module))

    def unsupported(self, module: nn.Module) -> None:
        raise UserError(
            f"d2prune cannot trace channels through '{self.names.get(module, '?')}' "
            f"({type(module).__name__}); supported are ResNet/ResNeXt(-FPN) backbones with "
            "RPN, standard, Cascade or Res5 ROI box/mask/keypoint heads, and RetinaNet heads."
        )

    # -- helpers for rules --------------------------------------------------------------------

    def trace(self, module: nn.Module, *spaces):
        """Hand `module` to the rule of its type, with the spaces it reads; returns its outputs."""
        rule = rule_for(module)
        if rule is None:
            self.unsupported(module)
        return rule.trace(self, module, *spaces)

    def shared(self, features: Dict[str, int], names: Iterable[str]) -> int:
        """One space for the features a head reads with shared weights."""
        spaces = [features[f] for f in names]
        for s in spaces[1:]:
            self.merge(spaces[0], s)
        return spaces[0]

    def chain(self, x: int, layers: Sequence[nn.Module]) -> int:
        """Thread space `x` through a sequence of layers; each conv/linear starts a head group."""
        for layer in layers:
            if is_layer(layer):
                self.consume(x, layer)
                x = self.space(self.names[layer], Kind.HEAD)
                self.produce(x, layer)
            elif is_norm(layer):
                self.members.append((x, "norms", layer))
            elif any(True for _ in layer.parameters()):
                self.unsupported(layer)
        return x

    # -- the model ----------------------------------------------------------------------------

    def build(self) -> List[ChannelGroup]:
        backbone = getattr(self.model, "backbone", None)
        if backbone is None:
            self.unsupported(self.model)
        features = self.trace(backbone)
        for module in self.model.modules():
            rule = rule_for(module)
            if rule is not None and rule.reads_features:
                rule.trace(self, module, features)
        self.tie_grouped_convs()
        self.check_coverage()
        return self.groups()

    def tie_grouped_convs(self) -> None:
        """A grouped conv's output group g reads only input group g: tie its input to its output.

        Both sides then form one group whose channels go in whole conv groups (ResNeXt conv2
        with conv1's output and conv3's input).
        """
        spaces: Dict[nn.Module, Dict[str, int]] = {}
        for s, role, module in self.members:
            spaces.setdefault(module, {})[role] = s
        for module, roles in spaces.items():
            if getattr(module, "groups", 1) == 1:
                continue
            if (
                isinstance(module, nn.ConvTranspose2d)
                or module.in_channels != module.out_channels
                or len(roles) != 2
            ):
                self.unsupported(module)
            self.merge(roles["producers"], roles["consumers"])

    def check_coverage(self) -> None:
        """Refuse models with channel-carrying layers that no rule accounts for."""
        covered = set()
        for _, _, module in self.members:
            covered.update(module.modules())  # a Conv2d's .norm, a CycleBatchNormList's BNs
        for module in self.model.modules():
            if module in covered:
                continue
            if is_layer(module) or is_norm(module) or any(
                True for _ in module.parameters(recurse=False)
            ):
                self.unsupported(module)

    def groups(self) -> List[ChannelGroup]:
        by_root: Dict[int, List[int]] = {}
        for s in range(len(self.parent)):
            by_root.setdefault(self.find(s), []).append(s)
        roles: Dict[int, Dict[str, List[nn.Module]]] = {}
        for s, role, module in self.members:
            roles.setdefault(self.find(s), {}).setdefault(role, []).append(module)

        groups = []
        for root in sorted(by_root):
            members = roles.get(root, {})
            producers = members.get("producers", [])
            consumers = members.get("consumers", [])
            norms = members.get("norms", [])
            if not producers or not consumers:
                continue  # nothing writes or nothing reads it, e.g. a stage output no one uses
            name, kind = max(
                (self.labels[s] for s in by_root[root]), key=lambda label: _KIND_RANK[Kind(label[1])]
            )
            sizes = {_out_channels(m) for m in producers}
            assert len(sizes) == 1, f"producers of {name} disagree on their width: {sizes}"
            units = [_gn_unit(getattr(m, "norm", None)) for m in producers]
            units += [_gn_unit(m) for m in norms]
            units += [m.out_channels // m.groups for m in producers if getattr(m, "groups", 1) > 1]
            groups.append(
                ChannelGroup(
                    name=name,
                    kind=Kind(kind).value,
                    size=sizes.pop(),
                    producers=[self.names[m] for m in producers],
                    consumers=[self.names[m] for m in consumers],
                    norms=[self.names[m] for m in norms],
                    unit=math.lcm(*units),
                )
            )
        return groups
