"""One module per stage kind, each with one entry point:

    run(src: Path, cfg: <Kind>Cfg, out: Path, params: Params) -> dict

`src` is the parent artifact, `out` an empty directory to fill (renamed into place by the runner when run returns),
and the dict carries `format` (hf | nf4 | gptq), `weights` (where the base weights are, relative to `out`) and any
stage-specific facts for artifact.json. A new method is a function in its kind's module plus its params schema in
config.py; a new kind is a module here plus one line in STAGES.
"""
from . import merge, peft, prune, ptq, quantize

STAGES = {"prune": prune, "quantize": quantize, "peft": peft, "merge": merge, "ptq": ptq}
