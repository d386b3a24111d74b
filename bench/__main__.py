"""`python -m bench` (what `make bench` runs): the op benchmark, then the training-step benchmark, on
the same device; results under bench/results/<device>/ (or beside --output)."""
import sys
from pathlib import Path

from bench import models, op

arguments = op.parse_args(sys.argv[1:])
op.main(sys.argv[1:], command="python -m bench")
model_arguments = ["--device", arguments.device]
if arguments.output:
    model_arguments += ["--output", str(Path(arguments.output).with_name("models.json"))]
models.main(model_arguments)
