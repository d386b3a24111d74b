"""The command line every benchmark module shares: parse, run, write the JSON and markdown results
under bench/results/<device>/ (or at ``--output``)."""
from __future__ import annotations

import sys
from collections.abc import Callable

from bench.op import RESULTS, device_folder
from bench.report import write_results


def run_and_write(argv, command: str, parse_args: Callable, run: Callable[..., dict], markdown: Callable[[dict], str],
                  filename: str) -> None:
    """``run(parse_args(argv))`` (``argv`` None: the process's), the command recorded as run, the
    results written to ``--output`` or bench/results/<device>/``filename``."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = " ".join([command, *argv])
    result = run(args)
    output = args.output or RESULTS / device_folder(result) / filename
    print("\nwritten: " + ", ".join(map(str, write_results(result, markdown(result), output))))
