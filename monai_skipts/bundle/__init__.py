"""What the bundle configs (``bundles/``) call, as named, documented, tested functions.

The steps of the train / evaluate / inference / multi-GPU bundles; ``bundles/common/*.json`` wire
them with ``_target_`` components and ``@`` references, by their names here:

- :mod:`monai_skipts.bundle.data`: the split and the check of its images before training, the
  loaders' seeded generator;
- :mod:`monai_skipts.bundle.prepare_batch`: the trainer's ``prepare_batch`` from the bundle's switches;
- :mod:`monai_skipts.bundle.model`: the trained model an evaluation scores with;
- :mod:`monai_skipts.bundle.processes`: the run folder (seed, lock) and the ``torchrun`` process group;
- :mod:`monai_skipts.bundle.tracking`: MLflow names, switch and registration;
- :mod:`monai_skipts.bundle.deferred`: values known only after a step (the calibrated threshold,
  ``metrics.json``'s extra entries);
- :mod:`monai_skipts.bundle.checks`: the command-line check every bundle runs first, the check of the
  segmentation head's options before training, the root cause printed last, and
  :func:`expression_share` (how much of a config is Python in ``$`` expressions).

Every function takes plain values (the bundle's top-level ids) and returns a plain value or a
component. The bundles' rule for ``initialize`` / ``run`` / ``finalize`` steps: a step that calls a
function is a ``_target_`` component (instantiating it calls the function with the named arguments,
e.g. ``{"_target_": "monai_skipts.bundle.prepare_output_dir", "output_dir": "@output_dir", "seed":
"@seed"}``); a step that runs a component is a ``$`` expression (``"$@train#trainer.run()"``), or a
component whose ``_target_`` is the bound method (``{"_target_": "$@predictor.run", "inputs":
"@input", ...}``, MONAI resolves a non-string target as the callable itself). Nothing here depends on
the working directory except the relative paths a user gives (``output_dir``, ``dataset_dir``), which
mean what they mean on the command line.

In a config: ``{"_target_": "monai_skipts.bundle.build_split", "dataset": "@dataset", ...}`` or
``"$monai_skipts.bundle.prepare_output_dir(@output_dir, @seed)"``.
"""

from monai_skipts.bundle.checks import (
    UnknownOptionError,
    check_command_line,
    check_overrides,
    check_seg_head,
    command_line_overrides,
    expression_share,
    install_root_cause_hook,
    root_cause,
)
from monai_skipts.bundle.data import build_split, check_split_images, seeded_generator
from monai_skipts.bundle.deferred import deferred_attribute, metrics_extras
from monai_skipts.bundle.model import TrainedModel, load_trained_model
from monai_skipts.bundle.prepare_batch import denoising_prepare_batch, training_prepare_batch
from monai_skipts.bundle.processes import (
    end_distributed,
    init_distributed,
    is_secondary_rank,
    prepare_output_dir,
    release_output_dir,
)
from monai_skipts.bundle.tracking import (
    evaluation_run_name,
    experiment_name,
    mlflow_disabled,
    register_model,
    registered_model_name,
    tracking_uri,
    training_run_name,
)
