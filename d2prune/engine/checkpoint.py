"""A DetectionCheckpointer that carries the pruned architecture along with the weights.

A pruned checkpoint stores its channel spec; loading it cuts the freshly built model to that spec
first, and any tensor whose shape still differs is an error instead of fvcore's skip-and-warn.
"""

from typing import Any, Dict

from detectron2.checkpoint import DetectionCheckpointer

from ..errors import UserError
from ..pruning import apply_spec, channel_spec

__all__ = ["PrunedCheckpointer"]


class PrunedCheckpointer(DetectionCheckpointer):
    """Saves `checkpoint["d2prune"] = {"spec": {group: width}}` and applies it on load.

    Checkpoints without a spec (model zoo `.pkl`, ImageNet weights, plain `.pth`) load into the
    model as it is, with Detectron2's usual handling; pruning happens after such a load.
    """

    _loading = "the checkpoint"  # the file being loaded, named in errors

    def save(self, name: str, **kwargs: Any) -> None:
        # Plain dict/str/int only, so that torch.load(weights_only=True) reads it back.
        kwargs["d2prune"] = {"spec": channel_spec(self.model)}
        super().save(name, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._loading = filename
        return super()._load_file(filename)

    def _load_model(self, checkpoint: Dict[str, Any]):
        meta = checkpoint.get("d2prune")
        if meta is None:
            return super()._load_model(checkpoint)
        filename = self._loading
        try:
            apply_spec(self.model, meta["spec"])
        except UserError as e:
            raise UserError(f"{filename}: {e}") from None

        self._convert_ndarray_to_tensor(checkpoint["model"])
        shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        for key, tensor in checkpoint["model"].items():
            key = key[len("module.") :] if key.startswith("module.") else key
            if key in shapes and tuple(tensor.shape) != shapes[key]:
                raise UserError(
                    f"{filename}: tensor '{key}' has shape {tuple(tensor.shape)} but the model "
                    f"pruned to the checkpoint's channel spec expects {shapes[key]}."
                )
        incompatible = super()._load_model(checkpoint)
        if incompatible.missing_keys:
            raise UserError(
                f"{filename}: the pruned checkpoint lacks tensor '{incompatible.missing_keys[0]}' "
                f"(and {len(incompatible.missing_keys) - 1} more) of the model it describes."
            )
        return incompatible
