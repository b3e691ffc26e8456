"""One-shot pruning of a trained detector: evaluate, score, prune, evaluate, fine-tune, report.

The flow behind `tools/prune_net.py`. Fine-tuning goes through the pruned checkpoint and the
ordinary trainer, so a pruned model is trained exactly as it will later be reloaded.
"""

import logging
import os
import time
from typing import Dict, Iterator, List, Optional

import torch
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng

from .. import criteria
from ..complexity import count_flops, count_params, measure_latency, width_table
from ..config import check_prune_config
from ..errors import UserError
from ..pruning import channel_spec, find_groups, prune
from ..pruning.budget import Budget
from ..utils.io import write_json
from .checkpoint import PrunedCheckpointer
from .scoring import ScoringBatches
from .selection import (
    build_criterion,
    build_latency_model,
    check_budget,
    choose_keep,
    needs_batches,
    sample_inputs,
)
from .trainer import Trainer, build_coco_evaluator

logger = logging.getLogger(__name__)


def bbox_metrics(results: Dict) -> Dict[str, float]:
    """{"bbox_AP": ..., "bbox_AP50": ..., "bbox_AP75": ...} from COCOEvaluator results."""
    return {f"bbox_{k}": float(v) for k, v in results["bbox"].items() if k in ("AP", "AP50", "AP75")}


def evaluate(cfg, model, folder: str) -> Dict[str, float]:
    """COCO bbox metrics of `model` on the first test dataset; detections go to `folder`."""
    dataset = cfg.DATASETS.TEST[0]
    loader = Trainer.build_test_loader(cfg, dataset)
    evaluator = build_coco_evaluator(cfg, dataset, folder)
    return bbox_metrics(inference_on_dataset(model, loader, evaluator))


def measure(cfg, model, latency_repeats: int = 10) -> Dict[str, float]:
    """Size and speed of `model` at the config's test resolution."""
    model.eval()
    inputs, tensor = sample_inputs(cfg, model)
    return {
        "params": count_params(model),
        "flops": count_flops(model, inputs)["total"],
        "backbone_flops": count_flops(model.backbone, tensor)["total"],
        "latency_ms": round(measure_latency(model, inputs, repeats=latency_repeats)["median_ms"], 2),
        "backbone_latency_ms": round(
            measure_latency(model.backbone, tensor, repeats=latency_repeats)["median_ms"], 2
        ),
        "image_size": cfg.INPUT.MIN_SIZE_TEST,
    }


def check_oneshot_config(cfg) -> criteria.Criterion:
    """Check the PRUNE keys and the test dataset before any slow work; return the criterion."""
    check_prune_config(cfg)
    if not cfg.MODEL.WEIGHTS:
        raise UserError("MODEL.WEIGHTS is empty: name the trained checkpoint to prune.")
    if not cfg.DATASETS.TEST:
        raise UserError("DATASETS.TEST is empty: name the dataset to evaluate before and after pruning.")
    criterion = build_criterion(cfg)
    if criterion.data != "none" and not cfg.DATASETS.TRAIN:
        raise UserError(
            f"PRUNE.CRITERION '{cfg.PRUNE.CRITERION}' scores channels on training images: name them "
            "in DATASETS.TRAIN (or pick a weight-only criterion such as l1)."
        )
    if needs_batches(cfg, criterion) and not cfg.DATASETS.TRAIN:
        raise UserError(
            "PRUNE.MODE 'cost' with PRUNE.COST_WEIGHTING 'sensitivity' measures the training loss: name "
            "training images in DATASETS.TRAIN (or set PRUNE.COST_WEIGHTING uniform)."
        )
    return criterion


def scoring_batches(cfg, criterion: criteria.Criterion) -> Optional[Iterator[List[dict]]]:
    """For a data-driven criterion (or weighting "sensitivity"), the PRUNE.SCORE_BATCHES batches
    a first pruning event of a training run would score on (`ScoringBatches`, seeded by SEED):
    the same images on every run. None when choosing channels reads no data."""
    if not needs_batches(cfg, criterion):
        return None
    return ScoringBatches.from_config(cfg)(0)


def prune_oneshot(cfg, output_dir: str, finetune_iters: int = 0, latency_repeats: int = 10) -> Dict:
    """Prune the checkpoint `cfg.MODEL.WEIGHTS` once; write the pruned checkpoint and reports.

    Returns the report, also written as `output_dir/report.json` (atomically).
    """
    criterion = check_oneshot_config(cfg)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"{output_dir}: exists and is not a directory; the output must be a directory.")
    os.makedirs(output_dir, exist_ok=True)
    model = build_model(cfg)
    checkpointer = PrunedCheckpointer(model, save_dir=output_dir)
    checkpointer.unpruned_spec = channel_spec(model)  # as built: saved beside the pruned spec
    checkpointer.load(cfg.MODEL.WEIGHTS)
    check_budget(cfg, model)  # before the slow evaluation: a budget that removes nothing fails now
    model.eval()

    budget = Budget.from_config(cfg)
    report = {
        "weights": cfg.MODEL.WEIGHTS,
        "criterion": cfg.PRUNE.CRITERION,
        "ratio": budget.amount if budget.target == "channels" else None,
        "flops_reduction_target": budget.amount if budget.target == "flops" else None,
        "latency_reduction_target": budget.amount if budget.target == "latency" else None,
        "mode": budget.mode,
        "kinds": list(budget.kinds),
        "dataset": cfg.DATASETS.TEST[0],
    }
    logger.info("Evaluating the model before pruning")
    report["before"] = {**evaluate(cfg, model, os.path.join(output_dir, "eval_before")), **measure(cfg, model, latency_repeats)}
    spec_before = channel_spec(model)
    groups = find_groups(model)

    cost_model = build_latency_model(cfg, model) if budget.target == "latency" else None
    keep = choose_keep(cfg, model, criterion, scoring_batches(cfg, criterion), cost_model=cost_model)
    start = time.perf_counter()
    with torch.no_grad():
        prune(model, keep)
    report["surgery_seconds"] = round(time.perf_counter() - start, 3)
    spec = channel_spec(model)
    report["spec"] = spec
    report["widths"] = width_table(spec_before, spec, groups)
    if cost_model is not None:
        report["latency_model"] = {
            "predicted_before_ms": cost_model.predict(spec_before), "predicted_after_ms": cost_model.predict(spec),
            "width_step": cost_model.meta["step"], "tables": cost_model.meta["path"],
        }  # fmt: skip

    logger.info("Evaluating the model after pruning")
    report["after"] = {**evaluate(cfg, model, os.path.join(output_dir, "eval_after")), **measure(cfg, model, latency_repeats)}
    pruned_path = os.path.join(output_dir, "model_pruned.pth")
    checkpointer.save("model_pruned")
    report["pruned_weights"] = pruned_path

    if finetune_iters > 0:
        report["finetuned"] = finetune(cfg, pruned_path, output_dir, finetune_iters, report["after"])
    write_json(os.path.join(output_dir, "report.json"), report)
    return report


def finetune(cfg, weights: str, output_dir: str, iters: int, after: Dict) -> Dict:
    """Fine-tune the pruned checkpoint for `iters` iterations and evaluate it again."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.OUTPUT_DIR = os.path.join(output_dir, "finetune")
    cfg.SOLVER.MAX_ITER = iters
    cfg.SOLVER.STEPS = tuple(s for s in cfg.SOLVER.STEPS if s < iters)
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, iters // 10)
    cfg.TEST.EVAL_PERIOD = 0  # the trainer still evaluates once, at the end
    cfg.DATASETS.TEST = cfg.DATASETS.TEST[:1]
    cfg.freeze()
    # As detectron2's default_setup does for train_net.py: SEED fixes the data order.
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    result = {k: after[k] for k in ("params", "flops", "backbone_flops", "latency_ms", "backbone_latency_ms")}
    result.update(bbox_metrics(trainer.train()))
    result["iterations"] = iters
    result["weights"] = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    return result
