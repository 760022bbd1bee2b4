"""Entry point of every rank of a `deepspeed` launch: `python -m components.train.worker job.json`.

The launcher appends `--local_rank=N`; the rank, world size and master address arrive in the
environment, which the training loop reads.
"""

from __future__ import annotations

import argparse
import json
import logging

from components.train.launch import execute_job


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("job", help="job.json written by components.train.launch.run_job")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with open(args.job, encoding="utf-8") as handle:
        execute_job(json.load(handle))


if __name__ == "__main__":
    main()
