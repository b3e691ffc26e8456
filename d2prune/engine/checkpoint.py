"""A DetectionCheckpointer that carries the pruned architecture along with the weights.

A pruned checkpoint stores its channel spec; loading it cuts the freshly built model to that spec
first, and any tensor whose shape still differs is an error instead of fvcore's skip-and-warn,
except classifiers moving to another number of classes, which are re-initialised.
Checkpoints are written atomically, so a run killed at any moment can resume from its last one.
"""

import os
import pickle
import re
import zipfile
from typing import Any, Dict, Mapping, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from torch import nn

from ..errors import UserError
from ..pruning import apply_spec, channel_spec
from ..pruning.spec import class_layers
from ..utils.io import atomic_open, atomic_write_text

__all__ = ["PrunedCheckpointer", "load_model"]

# A checkpoint that `atomic_open` was writing when its process died (see d2prune.utils.io).
_TORN = re.compile(r"^\..+\.pth\.[0-9a-f]{8}\.tmp$")

# What reading a file that is not a checkpoint (or cannot be read) raises: torch.load, pickle, zip.
_UNREADABLE = (
    pickle.UnpicklingError, EOFError, RuntimeError, KeyError, ValueError, TypeError,
    AttributeError, IndexError, UnicodeDecodeError, AssertionError, OSError, zipfile.BadZipFile,
)


class PrunedCheckpointer(DetectionCheckpointer):
    """Saves `checkpoint["d2prune"] = {"spec": {group: width}, "unpruned": {group: width}}` and
    applies the spec on load. A pruned model's weights go in that entry too (`["d2prune"]["model"]`,
    no top-level "model"), so that Detectron2's own loaders refuse the file instead of skipping
    every pruned tensor with a warning.

    `unpruned_spec` holds the widths of the model as its config builds it. It is set on every
    load of a pruned checkpoint (the model being loaded into is freshly built) and by whoever
    creates the checkpointer for a freshly built model (the trainer). Saved beside the spec, it
    lets a load into a model built from another config fail, naming the group that differs,
    instead of silently cutting that model to the checkpoint's widths.

    `records_spec` says whether saves record the spec at all: a trainer that does not prune
    turns it off, so that models d2prune cannot trace train like in plain Detectron2; loading a
    pruned checkpoint turns it on again.

    Checkpoints without a spec (model zoo `.pkl`, ImageNet weights, plain `.pth`) load into the
    model as it is, with Detectron2's usual handling; pruning happens after such a load.
    A pruned checkpoint loads into a model with another number of classes: the layers whose
    output width that number sets (`class_layers`) keep their fresh initialisation, with one
    warning. Files that are missing or are not checkpoints are a `UserError` naming the file.
    """

    unpruned_spec: Optional[Dict[str, int]] = None
    records_spec: bool = True
    _loading = "the checkpoint"  # the file being loaded, named in errors
    _last = None  # the file `last_checkpoint` named, when resuming

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's `save` (same file, same contents), written to a temporary file and renamed
        into place; `last_checkpoint` names it only once it is complete."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {}
        weights = self.model.state_dict()
        if self.records_spec:
            # Plain dict/str/int and tensors only, so that torch.load(weights_only=True) reads it.
            meta = data["d2prune"] = {"spec": channel_spec(self.model)}
            if self.unpruned_spec is not None:
                meta["unpruned"] = dict(self.unpruned_spec)
            if meta["spec"] != self.unpruned_spec:
                # Pruned (or not known to be unpruned): without a top-level "model", Detectron2's
                # loaders take the file for a bare state dict and refuse it ("Unsupported type
                # found in checkpoint! d2prune: <class 'dict'>") instead of half-loading it.
                meta["model"], weights = weights, None
        if weights is not None:
            data["model"] = weights
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        with atomic_open(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def get_checkpoint_file(self) -> str:
        path = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with open(path, encoding="utf-8") as f:
                name = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot be read ({e}); delete it to start from MODEL.WEIGHTS.") from None
        if not name:
            raise UserError(f"{path}: empty; it should name a checkpoint file in {self.save_dir}.")
        self._last = os.path.join(self.save_dir, name)
        if not os.path.isfile(self._last):
            raise UserError(
                f"{path} names {name}, which is not in {self.save_dir}; write the name of a "
                "complete checkpoint there, or delete it to start from MODEL.WEIGHTS."
            )
        return self._last

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """fvcore's `resume_or_load`; resuming also deletes the temporary files of checkpoints
        that a killed run left half written in the save folder."""
        if resume and self.save_to_disk and self.save_dir and os.path.isdir(self.save_dir):
            for name in os.listdir(self.save_dir):
                if _TORN.match(name):
                    self.logger.info("Removing %s, a checkpoint cut short by a crash", name)
                    os.unlink(os.path.join(self.save_dir, name))
        return super().resume_or_load(path, resume=resume)

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        # URLs and detectron2:// names are fetched by the path manager; local files must exist.
        if path and "://" not in path and not os.path.isfile(path):
            raise UserError(f"{path}: checkpoint file not found.")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._loading = filename
        try:
            loaded = super()._load_file(filename)
        except _UNREADABLE as e:
            first = str(e).strip().split("\n")[0].split(". ")[0][:160]
            reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
            if filename == self._last:
                raise UserError(
                    f"{filename}, which last_checkpoint names, is not a readable checkpoint "
                    f"({reason}); write an earlier checkpoint's name into last_checkpoint, or "
                    "delete it to start from MODEL.WEIGHTS."
                ) from None
            raise UserError(
                f"{filename}: not a checkpoint that torch.load or pickle can read ({reason}); "
                "expected a .pth written by torch.save or a Detectron2 model-zoo .pkl."
            ) from None
        loaded = _pruned_layout(loaded)
        model = loaded.get("model") if isinstance(loaded, Mapping) else None
        if not isinstance(model, Mapping) or not any(hasattr(v, "shape") for v in model.values()):
            raise UserError(
                f"{filename}: holds no model weights; expected a checkpoint whose 'model' entry "
                "(or the whole file) maps parameter names to tensors."
            )
        return loaded

    def _load_model(self, checkpoint: Dict[str, Any]):
        meta = checkpoint.get("d2prune")
        if meta is None:
            return super()._load_model(checkpoint)
        filename = self._loading
        try:
            built = channel_spec(self.model)  # the model as its config builds it: loading comes first
        except UserError as e:
            raise UserError(f"{filename}: a pruned checkpoint, but {e}") from None
        _check_architecture(filename, meta, built)
        try:
            apply_spec(self.model, meta["spec"])
        except UserError as e:
            raise UserError(f"{filename}: {e}") from None
        self.unpruned_spec = built
        self.records_spec = True

        weights = checkpoint["model"]
        self._convert_ndarray_to_tensor(weights)
        shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        classifiers = set(class_layers(self.model))
        reset = []
        for key, tensor in list(weights.items()):
            name = key[len("module.") :] if key.startswith("module.") else key
            if name not in shapes or tuple(tensor.shape) == shapes[name]:
                continue
            # A classifier of another number of classes: only its output width (dim 0) differs,
            # the width it reads is a channel group and must match like any other.
            if name.rpartition(".")[0] in classifiers and tuple(tensor.shape[1:]) == shapes[name][1:]:
                del weights[key]
                reset.append(name)
                continue
            raise UserError(
                f"{filename}: tensor '{name}' has shape {tuple(tensor.shape)} but the model "
                f"pruned to the checkpoint's channel spec expects {shapes[name]}."
            )
        if reset:
            layers = sorted({name.rpartition(".")[0] for name in reset})
            self.logger.warning(
                "%s: the model has another number of classes than the checkpoint; %s keep their "
                "fresh initialisation.", filename, ", ".join(layers),
            )
        incompatible = super()._load_model(checkpoint)
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in reset]
        if incompatible.missing_keys:
            raise UserError(
                f"{filename}: the pruned checkpoint lacks tensor '{incompatible.missing_keys[0]}' "
                f"(and {len(incompatible.missing_keys) - 1} more) of the model it describes."
            )
        return incompatible


def _pruned_layout(loaded: Any) -> Any:
    """A pruned checkpoint holds its weights in its d2prune entry; DetectionCheckpointer, seeing
    no top-level "model", wrapped the whole file as {"model": file}: undo both."""
    inner = loaded.get("model") if isinstance(loaded, Mapping) else None
    meta = inner.get("d2prune") if isinstance(inner, Mapping) else None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("model"), Mapping):
        return loaded
    loaded = dict(inner)
    loaded["d2prune"] = dict(meta)
    loaded["model"] = loaded["d2prune"].pop("model")
    return loaded


def _check_architecture(filename: str, meta: Any, built: Mapping[str, int]) -> None:
    """Fail, naming a group and both widths, when a pruned checkpoint cannot have come from the
    model that the config builds: other channel groups, other widths before pruning, or a group
    wider than the config makes it."""
    spec = meta.get("spec") if isinstance(meta, Mapping) else None
    if not isinstance(spec, Mapping):
        raise UserError(f"{filename}: its 'd2prune' entry has no channel spec; the file is damaged.")
    unpruned = meta.get("unpruned")
    reference = unpruned if isinstance(unpruned, Mapping) else spec
    advice = "load it with the config it was trained with (model depth, FPN width and heads must match)."
    extra = next((name for name in reference if name not in built), None)
    if extra is not None:
        raise UserError(
            f"{filename}: the checkpoint comes from another architecture than the config builds: "
            f"it has channel group '{extra}', which the model does not have; {advice}"
        )
    lacking = next((name for name in built if name not in reference), None)
    if lacking is not None:
        raise UserError(
            f"{filename}: the checkpoint comes from another architecture than the config builds: "
            f"the model has channel group '{lacking}' ({built[lacking]} channels), which the "
            f"checkpoint does not (it has {len(reference)} groups, the model {len(built)}); {advice}"
        )
    if unpruned is reference:
        differs = next((name for name, width in unpruned.items() if width != built[name]), None)
        if differs is not None:
            raise UserError(
                f"{filename}: the checkpoint was pruned from a model whose group '{differs}' has "
                f"{unpruned[differs]} channels, but the config builds it with {built[differs]}; {advice}"
            )
    wider = next((n for n, w in spec.items() if isinstance(w, int) and w > built.get(n, w)), None)
    if wider is not None:
        raise UserError(
            f"{filename}: group '{wider}' has {spec[wider]} channels in the checkpoint but only "
            f"{built[wider]} in the model the config builds; {advice}"
        )


def load_model(cfg, weights: Optional[str] = None) -> nn.Module:
    """The detector of `cfg` with `weights` (default MODEL.WEIGHTS) loaded, in eval mode.

    A pruned checkpoint cuts the freshly built model to its channel spec first, so the pruned
    architecture is what comes back; any tensor whose shape still differs is an error, except
    classifiers of another number of classes, which keep their fresh initialisation.
    """
    model = build_model(cfg)
    PrunedCheckpointer(model).load(cfg.MODEL.WEIGHTS if weights is None else weights)
    return model.eval()
