#!/usr/bin/env python
"""Print bbox AP, AP50, iterations and wall time of finished runs.

    python tools/summarize.py output/demo/source [more output dirs ...]
"""

import argparse
import os
import sys

from d2prune.errors import exit_on_user_error

# The experiments and reports in projects/ sit on top of the library, beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from projects.prune_report import run_summary_table  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR")
    args = parser.parse_args()
    print(exit_on_user_error(run_summary_table, args.output_dirs))


if __name__ == "__main__":
    main()
