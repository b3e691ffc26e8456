"""Datasets: registration and validation of COCO-format files, and the synthetic domains."""

from .coco import register_coco, register_datasets, validate_coco_json, validate_datasets

__all__ = ["register_coco", "register_datasets", "validate_coco_json", "validate_datasets"]
