"""d2prune: prune Detectron2 detectors while fine-tuning them on small datasets.

Filters are scored during fine-tuning, the least useful are removed physically, and mAP, size and
speed are reported before and after.
"""

__version__ = "0.1.0"
