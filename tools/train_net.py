#!/usr/bin/env python
"""Train or evaluate a Detectron2 detector with d2prune's config keys and datasets.

    python tools/train_net.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml
    python tools/train_net.py --config-file configs/synthetic/prune/faster_rcnn_R18_FPN_target_l1.yaml
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --dataset my_train train.json images/ \
        DATASETS.TRAIN "('my_train',)"
    python tools/train_net.py --launcher slurm --partition gpu --num-machines 2 --num-gpus 8 --config-file CFG

With `--launcher slurm` the training is one Slurm job submitted through submitit: each machine runs
one task, whose `--num-machines`, `--machine-rank` and `--dist-url` come from the Slurm
environment; a preempted or timed-out job is requeued and resumes from its last checkpoint.
"""

import os
import sys

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from d2prune.compat import launch_from_args
from d2prune.config import check_run, check_weights, setup_cfg
from d2prune.data import add_dataset_argument, register_datasets, validate_datasets
from d2prune.engine import PrunedCheckpointer, PruningTrainer, Trainer
from d2prune.errors import UserError, exit_on_user_error

# The Slurm launcher lives in projects/, beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from projects.cluster import add_launcher_arguments, check_launcher, submit_training  # noqa: E402


def setup(args):
    cfg = setup_cfg(args.config_file, args.opts, args.dataset)
    check_run(cfg, comm.get_world_size(), training=not args.eval_only)
    cfg.freeze()
    default_setup(cfg, args)
    # Pruning events and checks log under d2prune, as detectron2 projects log under their name.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2prune")
    return cfg


def main(args):
    cfg = setup(args)
    register_datasets(cfg)
    if args.eval_only:
        if not cfg.DATASETS.TEST:
            raise UserError("--eval-only evaluates on DATASETS.TEST, which is empty; name a registered dataset there.")
        validate_datasets(cfg, cfg.DATASETS.TEST)  # the training sets need not even exist
        check_weights(cfg)
        model = Trainer.build_model(cfg)
        PrunedCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    validate_datasets(cfg)
    if not (args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
        check_weights(cfg)  # otherwise training resumes from the checkpoint last_checkpoint names
    trainer = (PruningTrainer if cfg.PRUNE.ENABLED else Trainer)(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def guarded_main(args):
    return exit_on_user_error(main, args)


def check_before_launch(args):
    """The config faults every process would meet, stated once before any process starts."""
    check_launcher(args.launcher, args.partition, args.num_machines)
    cfg = setup_cfg(args.config_file, args.opts, args.dataset)
    check_run(cfg, args.num_gpus * args.num_machines, training=not args.eval_only)


def submit(args):
    """Submit this training as one submitit job (`--launcher slurm|local-submitit`). Each machine's
    task gets one CPU core per data loader worker and one for its training process, per GPU."""
    cfg = setup_cfg(args.config_file, args.opts, args.dataset)
    return submit_training("train_net:guarded_main", args, cfg.OUTPUT_DIR,
                           cpus_per_task=args.num_gpus * (cfg.DATALOADER.NUM_WORKERS + 1))


def argument_parser():
    parser = default_argument_parser()
    add_dataset_argument(parser)
    add_launcher_arguments(parser, timeout_min=24 * 60)
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    exit_on_user_error(check_before_launch, args)
    if args.launcher == "local":
        exit_on_user_error(launch_from_args, guarded_main, args)
    else:
        exit_on_user_error(submit, args)
