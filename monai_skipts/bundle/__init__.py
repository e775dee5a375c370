"""What the bundle configs (``bundles/``) call, as named, documented, tested functions.

- :mod:`monai_skipts.bundle.workflow`: the steps of the train / evaluate / inference / multi-GPU
  bundles (split, data loading, the trained model, run folder, MLflow names and registration);
  ``bundles/common/*.json`` wire them with ``_target_`` components and ``@`` references.
- :mod:`monai_skipts.bundle.checks`: the command-line check every bundle runs first, the root cause
  printed last, and :func:`expression_share` (how much of a config is Python in ``$`` expressions).

In a config: ``{"_target_": "monai_skipts.bundle.build_split", "dataset": "@dataset", ...}`` or
``"$monai_skipts.bundle.prepare_output_dir(@output_dir, @seed)"``.
"""

from monai_skipts.bundle.checks import (
    UnknownOptionError,
    check_command_line,
    check_overrides,
    command_line_overrides,
    expression_share,
    install_root_cause_hook,
    root_cause,
)
from monai_skipts.bundle.workflow import (
    TrainedModel,
    build_split,
    check_split_images,
    deferred_attribute,
    denoising_prepare_batch,
    end_distributed,
    evaluation_run_name,
    experiment_name,
    init_distributed,
    is_secondary_rank,
    load_trained_model,
    metrics_extras,
    mlflow_disabled,
    prepare_output_dir,
    register_model,
    registered_model_name,
    release_output_dir,
    seeded_generator,
    tracking_uri,
    training_prepare_batch,
    training_run_name,
)
