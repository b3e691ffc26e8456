"""Datasets: registration and validation of COCO-format files, and the synthetic domains."""

from .coco import (
    add_dataset_argument,
    register_coco,
    register_datasets,
    validate_coco_json,
    validate_datasets,
)

__all__ = ["add_dataset_argument", "register_coco", "register_datasets", "validate_coco_json", "validate_datasets"]
