"""`python -m bench` (what `make bench` runs): the op benchmark, then the training-step benchmark, on
the same device; results under bench/results/<device>/ (or beside --output). ``--quick``: about a
minute on a CPU."""
import sys

from bench import models, op

arguments = op.parse_args(sys.argv[1:])
op.main(sys.argv[1:], command="python -m bench")
model_arguments = ["--device", arguments.device] + (["--quick"] if arguments.quick else [])
if arguments.output:
    model_arguments += ["--output", str(arguments.output.with_name("models.json"))]
models.main(model_arguments, command="python -m bench")
