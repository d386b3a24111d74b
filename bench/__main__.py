"""`python -m bench` (what `make bench` runs): the op benchmark, the training-step benchmark, the
subset op against the row-mode op, on the same device, the training-quality check (CPU) and a
call's fixed cost; results under bench/results/<device>/ (or beside --output). ``--quick``: a few
minutes on a CPU."""
import sys

from bench import fixed_cost, models, op, quality, subset_op

arguments = op.parse_args(sys.argv[1:])
op.main(sys.argv[1:], command="python -m bench")
model_arguments = ["--device", arguments.device] + (["--quick"] if arguments.quick else [])
if arguments.output:
    model_arguments += ["--output", str(arguments.output.with_name("models.json"))]
models.main(model_arguments, command="python -m bench")
quick = ["--quick"] if arguments.quick else []
output = (lambda name: ["--output", str(arguments.output.with_name(name))]) if arguments.output else (lambda name: [])
subset_op.main(["--device", arguments.device, *quick, *output("subset_op.json")], command="python -m bench")
quality.main([*quick, *output("quality.json")], command="python -m bench")
fixed_cost.main(["--device", arguments.device, *quick, *output("fixed_cost.json")], command="python -m bench")
