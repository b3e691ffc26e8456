#!/usr/bin/env python
"""Train or evaluate a detector from a LazyConfig, pruning on its `prune` schedule: detectron2's
tools/lazyconfig_train_net.py with d2prune's checkpoints, which carry the pruned architecture.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/faster_rcnn_R18_FPN_synthetic_prune.py
    python tools/lazyconfig_train_net.py --config-file CFG --resume
    python tools/lazyconfig_train_net.py --config-file CFG --eval-only train.init_checkpoint=PRUNED.pth
    python tools/lazyconfig_train_net.py --config-file CFG --dataset my_train train.json images/ \
        'dataloader.train.dataset.names=my_train'
"""

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from d2prune.compat import launch_from_args
from d2prune.data import add_dataset_argument
from d2prune.engine.lazy import do_eval, do_train, load_lazy_config, register_lazy_datasets
from d2prune.errors import exit_on_user_error


def main(args):
    cfg = load_lazy_config(args.config_file, args.opts, args.dataset)
    default_setup(cfg, args)
    setup_logger(output=cfg.train.output_dir, distributed_rank=comm.get_rank(), name="d2prune")
    register_lazy_datasets(cfg)
    if args.eval_only:
        return do_eval(cfg)
    return do_train(cfg, resume=args.resume)


def guarded_main(args):
    return exit_on_user_error(main, args)


def argument_parser():
    parser = default_argument_parser()
    add_dataset_argument(parser, "same as a datasets.coco entry")
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    exit_on_user_error(launch_from_args, guarded_main, args)
