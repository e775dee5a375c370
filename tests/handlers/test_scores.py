"""AnomalyScoreHandler over a real ignite Engine: pooled pixel metrics, and what it keeps afterwards."""

from __future__ import annotations

import numpy as np
import torch
from ignite.engine import Engine

from monai_skipts.handlers import AnomalyScoreHandler
from monai_skipts.metrics import pixel_metrics


def _batches(n_batches: int = 4, batch: int = 3, size: int = 16) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for b in range(n_batches):
        maps = rng.random((batch, 1, size, size)).astype(np.float32)
        masks = np.zeros((batch, 1, size, size), np.float32)
        masks[1:, :, 4:9, 5:11] = 1.0  # the first image of each batch is normal
        maps[1:, :, 4:9, 5:11] += 0.3
        out.append(
            {
                "pred": torch.from_numpy(maps),
                "mask": torch.from_numpy(masks),
                "label": torch.tensor([0] + [1] * (batch - 1)),
                "id": [f"b{b}_{i}.png" for i in range(batch)],
            }
        )
    return out


def test_pixel_metrics_pool_every_batch_and_the_handler_keeps_no_batch_maps_afterwards():
    batches = _batches()

    def step(engine, batch):
        return {
            "score": batch["pred"].amax(dim=(1, 2, 3)),
            "pred": batch["pred"],
            "label": batch["label"],
            "id": batch["id"],
        }

    engine = Engine(step)
    handler = AnomalyScoreHandler(threshold=0.9, pixel_threshold=1.0)
    handler.attach(engine)
    engine.run(batches, max_epochs=1)

    maps = np.concatenate([b["pred"].numpy()[:, 0] for b in batches])
    masks = np.concatenate([b["mask"].numpy()[:, 0] > 0.5 for b in batches])
    expected = pixel_metrics(maps, masks, threshold=1.0)
    assert {k: handler.metrics[k] for k in expected} == expected
    assert handler.metrics["n_images"] == 12 and len(handler.records) == 12
    # the per-batch maps and masks are released once pooled: nothing image-sized outlives the epoch
    assert handler._maps == [] and handler._masks == []
