"""Run by torchrun from tests/test_multi_gpu.py: the demo bundle with the multi-GPU config merged in,
then each rank saves its student weights for the test to compare."""

import sys

import torch
from monai.bundle import ConfigWorkflow

out = sys.argv[1]
wf = ConfigWorkflow(
    config_file=["bundles/demo/train.json", "bundles/common/multi_gpu_train.json"],
    workflow_type="train",
    output_dir=out,
    epochs=2,
    n_train_images=8,
    spatial_size=64,
    batch_size=2,
    progress_bar=False,
    mlflow=False,
    target_fpr=0.5,
    calibration="empirical",  # 8 normals: too few to calibrate 5 %
)
wf.initialize()
wf.run()
rank = torch.distributed.get_rank()
net = wf.parser.get_parsed_content("network")
torch.save({k: v.cpu() for k, v in net.student.state_dict().items()}, f"{out}/student_rank{rank}.pt")
assert type(net.__dict__["_student_ddp"]).__name__ == "DistributedDataParallel"
wf.finalize()
