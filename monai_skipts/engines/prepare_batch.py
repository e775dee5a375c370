"""The engines' ``prepare_batch`` callables: plain channels-last tensors for the evaluator
(:class:`PlainTensorBatch`), the teacher-feature cache (:class:`TeacherFeatureCache`) and denoising
distillation (:class:`DenoisingBatch`) for the trainer; and the batch helpers the engines share.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from monai.engines.utils import default_prepare_batch

from monai_skipts.transforms.presets import has_random_transforms

__all__ = ["DenoisingBatch", "PlainTensorBatch", "TeacherFeatureCache", "batch_ids", "engine_batch", "plain_tensor"]


def batch_ids(batchdata: Any) -> list[str]:
    """The batch's image ids (``batchdata["id"]`` as strings); ``[]`` when it carries none."""
    if isinstance(batchdata, dict) and "id" in batchdata:
        return [str(i) for i in batchdata["id"]]
    return []


def engine_batch(engine: Any, batchdata: Any) -> tuple[Any, Any, tuple, dict]:
    """``(inputs, targets, args, kwargs)`` of ``batchdata`` through the engine's ``prepare_batch``."""
    batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
    if len(batch) == 2:
        return batch[0], batch[1], (), {}
    return batch[0], batch[1], tuple(batch[2]), dict(batch[3])


def plain_tensor(x: Any) -> Any:
    """``x`` as a plain ``torch.Tensor`` when it is a MONAI ``MetaTensor``, else ``x`` as it is."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


class PlainTensorBatch:
    """``prepare_batch`` for :class:`~monai_skipts.engines.SkipTSEvaluator` (its default): the batch of ``prepare_batch``
    (MONAI's ``default_prepare_batch`` unless given) with the image and label as plain
    ``torch.Tensor`` s, the image in channels-last memory format.

    MONAI's ``MetaTensor`` carries its metadata through every operation of the network (per-op
    bookkeeping that costs more than the small convolutions of the EfficientNet-Lite models), and
    channels-last is the layout the CPU (oneDNN) and CUDA (cuDNN) convolutions run fastest in; the
    network's weights are not touched (a convolution given a channels-last input computes in
    channels-last). ``benchmarks/speed.py`` measures both paths in one run.

    Args:
        prepare_batch: the inner ``prepare_batch(batchdata, device, non_blocking, **kwargs)``.
        channels_last: put 4-D images in channels-last memory format (values unchanged).
    """

    def __init__(self, prepare_batch: Callable = default_prepare_batch, channels_last: bool = True):
        self.prepare_batch = prepare_batch
        self.channels_last = bool(channels_last)

    def __call__(self, batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        batch = self.prepare_batch(batchdata, device, non_blocking, **kwargs)
        image, label = plain_tensor(batch[0]), plain_tensor(batch[1])
        if self.channels_last and isinstance(image, torch.Tensor) and image.ndim == 4:
            image = image.contiguous(memory_format=torch.channels_last)
        return (image, label) if len(batch) == 2 else (image, label, *batch[2:])


class TeacherFeatureCache:
    """``prepare_batch`` for :class:`~monai_skipts.engines.SkipTSTrainer` that computes each training image's teacher
    features once and reuses them every epoch (the teacher is frozen and, without random
    augmentation, sees the same image every epoch: the paper trains without augmentation).

    Batches must carry a unique ``"id"`` per image. Features are kept on ``storage_device`` in
    ``dtype`` (float16 halves memory: ~3.8 MB per 256² image for wide_resnet50_2, ~0.4 MB for
    efficientnet_lite0). Refuses a ``transform`` with random components, whose output changes
    every epoch and must not be cached.

    Returns ``(image, label, (), {"teacher_feats": [E1..E4]})``, the 4-tuple form that
    :class:`monai.engines.SupervisedTrainer` passes on to ``SkipTS.forward``.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        transform: Any = None,
        key: str = "id",
        dtype: torch.dtype | str = torch.float32,
        storage_device: str | torch.device = "cpu",
    ):
        if has_random_transforms(transform):
            raise ValueError(
                "teacher feature caching needs deterministic training transforms, but the training "
                "transform holds random ones; disable the cache (cache_teacher=false) or the augmentation"
            )
        self.network = network
        self.key = key
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.storage_device = torch.device(storage_device)
        self.store: dict[str, list[torch.Tensor]] = {}

    def __call__(self, batchdata: dict, device: torch.device, non_blocking: bool = False, **kwargs: Any):
        if not isinstance(batchdata, dict) or self.key not in batchdata:
            raise KeyError(f"TeacherFeatureCache needs batches with a unique '{self.key}' per image")
        image = batchdata["image"]
        # plain tensors: MetaTensor bookkeeping on every student op costs ~2x per step (benchmarks/speed.py)
        image = plain_tensor(image).to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata.get("label")
        label = label.to(device=device, non_blocking=non_blocking) if isinstance(label, torch.Tensor) else None
        ids = [str(i) for i in batchdata[self.key]]
        missing = [i for i, k in enumerate(ids) if k not in self.store]
        if missing:
            net = getattr(self.network, "module", self.network)
            feats = net.teacher_features(image[missing])
            for j, i in enumerate(missing):
                self.store[ids[i]] = [f[j].to(self.storage_device, self.dtype) for f in feats]
        feats = [
            torch.stack([self.store[k][level] for k in ids]).to(
                device=device, dtype=image.dtype, non_blocking=non_blocking
            )
            for level in range(4)
        ]
        return image, label, (), {"teacher_feats": feats}


class DenoisingBatch:
    """``prepare_batch`` for denoising distillation (the denoising student of DeSTSeg, Zhang et al.
    CVPR 2023, and RD++, Tien et al. CVPR 2023): the student reads the teacher's features of a
    *corrupted* image, and its loss compares what it produces with the teacher's features of the
    *clean* image, so it learns not to reproduce what does not belong to a normal image.

    Per batch:

    1. the clean image and its teacher features ``[E1..E4]`` from ``features`` (a
       :class:`TeacherFeatureCache`: cached, computed once per image; MONAI's ``default_prepare_batch``:
       the teacher runs here);
    2. optionally ``annotation`` (:class:`~monai_skipts.transforms.RandBurnedInAnnotation`) pastes
       captions and markers into some clean images as *normal* content (their clean features are
       computed again);
    3. ``lesion`` (:class:`~monai_skipts.transforms.RandSyntheticLesion`) corrupts a share ``lesion.prob``
       of the images inside their anatomy (``batchdata[anatomy_key]`` when the batch carries one, else
       :class:`~monai_skipts.transforms.AnatomyMask` of ``modality``, computed once per image id and
       kept); the foreign patches of the ``"fpi"`` family come from the next image of the batch;
    4. the teacher runs on the corrupted images only (the others keep their clean features).

    Returns ``(corrupted image, clean [E1, E2, E3], (), {"teacher_feats": corrupted [E1..E4]})``: MONAI's
    trainer hands the second element to the loss as ``targets`` (:func:`~monai_skipts.losses.teacher_target`:
    the clean features replace the teacher features the model's forward returns), the dictionary to
    the network's ``forward``. What the student sees, by architecture (all through ``teacher_feats``):

    - Skip-TS with skip connections: D3 reads E4 of the corrupted image and the skips E3, E2 of the
      corrupted image (so the skips carry the lesion, and the decoder is trained not to pass it on);
    - without skips (``skip="none"``): E4 of the corrupted image;
    - RD4AD's one-class bottleneck (``bottleneck=True``, :class:`~monai_skipts.networks.RD4AD`): the
      bottleneck's fusion of E1..E3 of the corrupted image;
    - the encoder student (traditional KD): the corrupted image itself.

    The target is always the teacher's E1..E3 of the clean image. :attr:`last_masks` holds the
    ``(B, 1, H, W)`` masks of the pixels changed in the last batch.

    Args:
        network: the :class:`~monai_skipts.networks.SkipTS` / ``RD4AD`` being trained (DDP-wrapped is fine).
        lesion: the corruption; its random state is the one to seed (``lesion.set_random_state``).
        features: the clean ``prepare_batch`` (see 1.).
        modality: :class:`~monai_skipts.transforms.AnatomyMask` preset for the anatomy.
        anatomy_key: batch key of precomputed ``(B, 1, H, W)`` anatomy masks.
        key: batch key of the unique image ids (the anatomy masks are kept per id; without ids they are
            computed every batch).
        annotation: optional burned-in annotations pasted as normal content.

    Example:
        >>> import torch
        >>> from monai_skipts.networks import SkipTS
        >>> from monai_skipts.transforms import RandSyntheticLesion
        >>> net = SkipTS("efficientnet_lite0", pretrained=False)
        >>> lesion = RandSyntheticLesion(prob=1.0, families=("intensity",)); _ = lesion.set_random_state(0)
        >>> prep = DenoisingBatch(net, lesion)
        >>> img = torch.zeros(2, 3, 64, 64); img[:, :, 8:56, 8:56] = torch.rand(2, 3, 48, 48) + 1
        >>> x, clean, _, kw = prep({"image": img, "id": ["a", "b"]}, "cpu")
        >>> len(clean), len(kw["teacher_feats"]), bool((x != img).any())
        (3, 4, True)
    """

    def __init__(
        self,
        network: torch.nn.Module,
        lesion: Any,
        features: Callable = default_prepare_batch,
        modality: str = "mri",
        anatomy_key: str = "anatomy",
        key: str = "id",
        annotation: Any = None,
    ):
        from monai_skipts.transforms.anatomy import AnatomyMask

        self.network = network
        self.lesion = lesion
        self.features = features
        self.masker = AnatomyMask(modality)
        self.anatomy_key, self.key = anatomy_key, key
        self.annotation = annotation
        self.anatomy_store: dict[str, torch.Tensor] = {}
        self.last_masks: torch.Tensor | None = None

    @property
    def store(self) -> dict:
        """The clean features' cache (the inner :class:`TeacherFeatureCache`'s), when there is one."""
        return getattr(self.features, "store", {})

    def _teacher(self, image: torch.Tensor) -> list[torch.Tensor]:
        net = getattr(self.network, "module", self.network)
        return net.teacher_features(image)

    def _replace(
        self, image: torch.Tensor, feats: list[torch.Tensor], rows: list[int], new: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Copies of ``image`` and its teacher features ``feats`` whose ``rows`` are those of ``new``
        (CPU images) and the teacher's features of them."""
        x = image.clone()
        x[rows] = new[rows].to(image.device, image.dtype)
        fresh = self._teacher(x[rows])
        out = [f.clone() for f in feats]
        for level, f in enumerate(fresh):
            out[level][rows] = f.to(out[level].dtype)
        return x, out

    def _anatomy(self, batchdata: dict, clean: torch.Tensor, i: int, ids: list[str] | None) -> torch.Tensor:
        given = batchdata.get(self.anatomy_key) if isinstance(batchdata, dict) else None
        if isinstance(given, torch.Tensor):
            return plain_tensor(given[i]).cpu()
        if ids is not None and ids[i] in self.anatomy_store:
            return self.anatomy_store[ids[i]]
        mask = self.masker(clean[i].detach().float().cpu()).bool()
        if ids is not None:
            self.anatomy_store[ids[i]] = mask
        return mask

    def __call__(self, batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        batch = self.features(batchdata, device, non_blocking, **kwargs)
        image = plain_tensor(batch[0])
        feats = list(batch[3]["teacher_feats"]) if len(batch) > 3 and "teacher_feats" in batch[3] else None
        if feats is None:
            feats = self._teacher(image)
        ids = [str(k) for k in batchdata[self.key]] if isinstance(batchdata, dict) and self.key in batchdata else None
        n = image.shape[0]
        clean_cpu = image.detach().float().cpu()
        anatomy = [self._anatomy(batchdata, clean_cpu, i, ids) for i in range(n)]
        if self.annotation is not None:
            annotated = []
            for i in range(n):
                out = self.annotation(clean_cpu[i])
                if bool(self.annotation.last_mask.any()):
                    clean_cpu[i] = torch.as_tensor(out)
                    annotated.append(i)
            if annotated:
                image, feats = self._replace(image, feats, annotated, clean_cpu)
        corrupted = clean_cpu.clone()
        masks = torch.zeros((n, 1, *image.shape[-2:]))
        for i in range(n):
            source = clean_cpu[(i + 1) % n] if n > 1 else None
            corrupted[i], masks[i] = self.lesion(clean_cpu[i], anatomy=anatomy[i], source=source)
        changed = [i for i in range(n) if bool(masks[i].any())]
        self.last_masks = masks
        student_feats = feats
        x = image
        if changed:
            x, student_feats = self._replace(image, feats, changed, corrupted)
        if x.ndim == 4 and image.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        return x, feats[:3], (), {"teacher_feats": student_feats}
