#!/usr/bin/env python
"""Pack a trained checkpoint for shipping: model weights only, in float16, with a record.

    python tools/pack_model.py output/synthetic/source/model_final.pth \
        models/faster_rcnn_R18_FPN_source.pth --note "make source at commit abc123"
"""

import argparse
import json

from d2prune.errors import exit_on_user_error
from d2prune.utils.pack import pack_checkpoint


def main(args):
    meta = pack_checkpoint(args.checkpoint, args.output, {"note": args.note})
    print(f"wrote {args.output}: {json.dumps(meta)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--note", default="", help="how the checkpoint was made")
    exit_on_user_error(main, parser.parse_args())
