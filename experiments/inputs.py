"""What an experiment reads: the 32-px sets held in memory, or ImageNet-1K's 224-px streams.

Every data access of the experiments goes through here, so that training, evaluation and
validation do not ask which kind of set a config names:

* 32-px sets (`cifar10`, `cifar100`, `svhn` in-distribution; `isomax_jax.data.EVAL_NAMES`):
  the training split is decoded once into memory (`isomax_jax.data.load_train_split`) and
  batched by `isomax_jax.data.TrainBatches`; evaluation sets by `isomax_jax.data.eval_dataset`,
  normalised with the in-distribution set's statistics.
* `imagenet2012` in-distribution: training batches stream from tfds's `imagenet2012`
  (`isomax_jax.data.imagenet_train_dataset`: random-resized crop `image_size` + flip), and
  evaluation sets (`isomax_jax.data.IMAGENET_EVAL_NAMES`: ImageNet validation, OpenOOD v1.5's
  sets, ImageNet-O) from `isomax_jax.data.imagenet_eval_dataset` (resize the shorter side to
  `eval_resize_size`, centre crop `image_size`), normalised with the statistics of the model's
  family (torchvision's for `tv_*`). The detectors are fitted on `fit_split`, streamed.

* `pack` (a directory written by ``python -m isomax_jax.pack_tfds write``): the 32-px sets are read
  from the pack's files (NumPy + Pillow) instead of tfds, with the same batching and
  normalisation; the report records it (:func:`pack_summary`).

Keys only ImageNet-scale configs or packs need are optional (:data:`OPTIONAL`, read with
:func:`option`): the 32-px configs and the workdirs they recorded stay as they were.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from isomax_jax import data
from isomax_jax.data import pipelines

IMAGENET = "imagenet2012"
#: In-distribution set -> number of classes.
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, IMAGENET: 1000}

#: Optional config keys and their defaults (what a config without the key means).
OPTIONAL: dict[str, Any] = {
    # 224-px input: the training crop (and evaluation crop), the evaluation resize, the number
    # of encoded examples in the training stream's shuffle buffer.
    "image_size": 224,
    "eval_resize_size": 256,
    "shuffle_buffer": 10_000,
    # The split the detectors are fitted on ("" = train_split); a tfds split expression.
    "fit_split": "",
    # A PyTorch state-dict file of `model` (torch.save(model.state_dict(), path)); "" = none.
    "pretrained": "",
    # Losses whose model is the imported one, evaluated without training ("softmax" only).
    "evaluate_as_imported": (),
    # ImageNet-O: "hendrycks" (200-class logits, the validation images of those classes) or
    # "dismax" (all 1000 logits, the whole validation set).
    "imagenet_o_protocol": "hendrycks",
    # {group: (OOD sets)}: the report's group means (OpenOOD's near / far).
    "ood_groups": {},
    # {detector: {hyperparameter: value}} replacing the papers' CIFAR defaults.
    "detector_hyperparameters": {},
    # A pack directory (isomax_jax.pack): the 32-px sets read from it instead of tfds.
    "pack": "",
    # Training input of 32-px sets: "host" (batches augmented on the host, prefetched to the
    # devices), "device" (the split on the devices, batches drawn and augmented inside the
    # jitted step: isomax_jax.device_data), "auto" (device on GPUs and TPUs, host on CPUs).
    "input": "auto",
}


def option(config: Any, key: str) -> Any:
    """``config[key]`` if the config has it, else its default of :data:`OPTIONAL`."""
    return config[key] if key in config else OPTIONAL[key]


def is_imagenet(config: Any) -> bool:
    return config.dataset == IMAGENET


def train_names() -> tuple[str, ...]:
    """In-distribution sets a model can be trained on."""
    return (*data.TRAIN_NAMES, IMAGENET)


def eval_names(config: Any) -> tuple[str, ...]:
    """The OOD sets a model trained on ``config.dataset`` can be evaluated against."""
    if is_imagenet(config):
        return tuple(n for n in data.IMAGENET_EVAL_NAMES if n != IMAGENET)
    return tuple(data.EVAL_NAMES)


def image_size(config: Any) -> int:
    """The side of the images the model is trained and evaluated on."""
    return int(option(config, "image_size")) if is_imagenet(config) else pipelines.IMAGE_SIZE


def fit_split(config: Any) -> str:
    return option(config, "fit_split") or config.train_split


def normalization(config: Any) -> str:
    """ImageNet-scale normalisation: the model's family (``tv_*``: torchvision's), else the
    ImageNet statistics themselves."""
    return config.model if config.model.startswith("tv_") else "torchvision"


@functools.lru_cache(maxsize=4)
def _open_pack(path: str) -> Any:
    from isomax_jax import pack

    return pack.Pack(path)


def packed(config: Any) -> Any:
    """The config's :class:`isomax_jax.pack.Pack`, or None (tfds)."""
    path = option(config, "pack")
    return _open_pack(os.path.abspath(path)) if path and not is_imagenet(config) else None


def pack_summary(config: Any) -> dict[str, Any] | None:
    """What the report records of the pack the images came from: its path, and per split read
    the stored pixels' mean and largest absolute error (0-255 scale)."""
    pack = packed(config)
    if pack is None:
        return None
    used = {config.dataset, *config.ood_datasets}
    return {
        "path": str(pack.path),
        "splits": {
            f"{name}/{split}": {"mae": entry["mae"], "max_error": entry["max_error"],
                                "codec": entry["codec"]}
            for name, info in pack.manifest["sets"].items() if name in used
            for split, entry in info["splits"].items()
        },
    }  # fmt: skip


def _dirs(config: Any, build_dir: str | None) -> dict[str, Any]:
    return dict(
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        build_dir=config.build_dir or build_dir,
    )


def trains_any(config: Any) -> bool:
    """Whether some loss of ``config`` is trained (not evaluated as imported)."""
    return any(loss not in option(config, "evaluate_as_imported") for loss in config.losses)


def availability_problems(config: Any, workdir: str, mode: str) -> list[str]:
    """Every training, fitting and evaluation set is prepared, buildable offline or
    downloadable; one message per set that is not (nothing is decoded or built)."""
    dirs = _dirs(config, os.path.join(workdir, "data"))
    problems = []
    wanted = []  # (key, name, split)
    if mode == "train_and_evaluate" and trains_any(config):
        wanted.append(("dataset", config.dataset, config.train_split))
    if fit_split(config) != config.train_split or not wanted:
        wanted.append(("fit_split", config.dataset, fit_split(config)))
    wanted += [("dataset", config.dataset, None)]
    wanted += [("ood_datasets", name, None) for name in config.ood_datasets]
    pack = None
    if option(config, "pack") and not is_imagenet(config):
        from isomax_jax.pack import PackError

        try:
            pack = packed(config)
        except PackError as err:
            return [f"config.pack={option(config, 'pack')!r}: {err}"]
    for key, name, split in wanted:
        if pack is not None:
            splits = pack.splits(name) if name in pack.names else ()
            if (split or "test") not in splits:
                what = f"split {split or 'test'!r} of {name!r}"
                problems.append(f"config.{key}: {what} is not in the pack {pack.path} "
                                f"(it has {list(pack.names)})")  # fmt: skip
            continue
        try:
            if is_imagenet(config):
                data.check_imagenet_available(name, split=split, **dirs)
            else:
                data.check_available(name, split=split, download=config.download, **dirs)
        except (data.DataNotFoundError, ValueError, FileNotFoundError) as err:
            what = f"split {split!r} of {name!r}" if split else repr(name)
            problems.append(f"config.{key}: {what} is not available: {err}")
    return problems


# ---------------------------------------------------------------------------------- training


def input_kind(config: Any, mesh: Any) -> str:
    """``"device"`` or ``"host"``: how ``config``'s training batches are made on ``mesh``
    (ImageNet always streams from the host)."""
    if is_imagenet(config):
        return "host"
    kind = option(config, "input")
    if kind == "auto":
        platform = mesh.devices.flat[0].platform
        kind = "device" if platform in ("gpu", "cuda", "rocm", "tpu") else "host"
    return kind


class TrainSource:
    """The training split of a config: its size and its batch stream from any step.

    ``batches(seed=, start=, num_steps=)`` is a context manager giving the NumPy batches
    ``{"image", "label"}`` of this process for steps ``start`` to ``start + num_steps``: the
    same stream for the same seed whatever ``start`` is (resuming replays nothing).
    """

    def __init__(self, config: Any, workdir: str):
        self.config = config
        self._dirs = _dirs(config, os.path.join(workdir, "data"))
        self._on_device: Any = None
        if is_imagenet(config):
            self.split = None
            self.num_examples = data.imagenet_num_examples(
                IMAGENET, split=config.train_split, **self._dirs
            )
        elif packed(config) is not None:
            self.split = packed(config).load(config.dataset, config.train_split)
            self.num_examples = len(self.split[0])
        else:
            self.split = data.load_train_split(
                config.dataset,
                split=config.train_split,
                data_dir=config.data_dir or None,
                download=config.download,
            )
            self.num_examples = len(self.split[0])

    def device_data(self, mesh: Any) -> Any:
        """The split on ``mesh``'s devices (:func:`isomax_jax.device_data.put`, once), its
        labels checked first."""
        from isomax_jax import device_data, validation

        if self._on_device is None or self._on_device.mesh is not mesh:
            images, labels = self.split
            validation.validate_labels(labels, NUM_CLASSES[self.config.dataset])
            pack = packed(self.config)
            if pack is not None:
                mean, std = pack.normalization(self.config.dataset)
            else:
                mean, std = data.normalization_stats(self.config.dataset)
            self._on_device = device_data.put(images, labels, mean=mean, std=std, mesh=mesh)
        return self._on_device

    @contextlib.contextmanager
    def batches(self, *, seed: int, start: int, num_steps: int) -> Iterator[Iterator[Any]]:
        config = self.config
        if self.split is not None:
            images, labels = self.split
            stream = data.TrainBatches(
                images, labels, batch_size=config.batch_size, seed=seed, name=config.dataset,
                process_index=jax.process_index(), process_count=jax.process_count(),
                start_step=start, num_steps=num_steps,
            )  # fmt: skip
            with stream:
                yield iter(stream)
            return
        stream = data.imagenet_train_dataset(
            batch_size=config.batch_size,
            seed=seed,
            normalization=normalization(config),
            split=config.train_split,
            image_size=image_size(config),
            start_step=start,
            num_steps=num_steps,
            shuffle_buffer=option(config, "shuffle_buffer"),
            **self._dirs,
        )
        yield iter(stream)


# -------------------------------------------------------------------------------- evaluation


def eval_batches(config: Any, name: str, *, classes: np.ndarray | None = None) -> Iterable[Any]:
    """The batches of evaluation set ``name`` (the in-distribution test set when ``name`` is
    ``config.dataset``), every example once over the processes, padded (``mask``).

    Args:
      classes: ImageNet only: keep the validation images of these class indices.
    """
    if is_imagenet(config):
        return data.imagenet_eval_dataset(
            name, batch_size=config.eval_batch_size, normalization=normalization(config),
            classes=classes, resize_size=option(config, "eval_resize_size"),
            crop_size=image_size(config), **_dirs(config, None),
        )  # fmt: skip
    if classes is not None:
        raise ValueError("classes= selects ImageNet classes")
    pack = packed(config)
    if pack is not None:
        images, labels = pack.load(name, "test")
        return data.EvalBatches(
            images, labels, batch_size=config.eval_batch_size, name=config.dataset,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )  # fmt: skip
    return data.eval_dataset(
        name, in_distribution=config.dataset, batch_size=config.eval_batch_size,
        download=config.download, **_dirs(config, None),
    )  # fmt: skip


class FitSplit:
    """The split the detectors are fitted on (``fit_split``), no augmentation, capped at
    ``cap`` examples; iterate :meth:`batches` once per model.

    32-px sets are decoded once and shared by every model; ImageNet streams its split again
    for each model (``classes``: only those classes, as ImageNet-O's protocol wants).
    """

    def __init__(self, config: Any, cap: int | None):
        self.config, self.cap = config, cap
        self._arrays = None
        if packed(config) is not None:
            images, labels = packed(config).load(config.dataset, fit_split(config))
            n = len(images) if cap is None else min(len(images), cap)
            self._arrays = images[:n], labels[:n]
        elif not is_imagenet(config):
            images, labels = data.load_train_split(
                config.dataset, split=fit_split(config), data_dir=config.data_dir or None,
                download=config.download,
            )  # fmt: skip
            n = len(images) if cap is None else min(len(images), cap)
            self._arrays = images[:n], labels[:n]

    def batches(self, *, classes: np.ndarray | None = None) -> Iterable[Mapping[str, Any]]:
        config = self.config
        if self._arrays is not None:
            if classes is not None:
                raise ValueError("classes= selects ImageNet classes")
            return data.EvalBatches(
                *self._arrays, batch_size=config.eval_batch_size, name=config.dataset,
                process_index=jax.process_index(), process_count=jax.process_count(),
            )  # fmt: skip
        stream = data.imagenet_eval_dataset(
            IMAGENET, split=fit_split(config), batch_size=config.eval_batch_size,
            normalization=normalization(config), classes=classes,
            resize_size=option(config, "eval_resize_size"), crop_size=image_size(config),
            **_dirs(config, None),
        )  # fmt: skip
        return capped(stream, self.cap)


def capped(batches: Iterable[Mapping[str, Any]], cap: int | None) -> Iterator[Mapping[str, Any]]:
    """The batches up to ``cap`` real examples (this process's), the rest masked out."""
    seen = 0
    for batch in batches:
        if cap is not None and seen >= cap:
            return
        mask = np.asarray(batch["mask"], bool)
        if cap is not None:
            mask = mask & (np.cumsum(mask) + seen <= cap)
        seen += int(mask.sum())
        yield {**batch, "mask": mask}


def remap_labels(
    batches: Iterable[Mapping[str, Any]], classes: np.ndarray
) -> Iterator[Mapping[str, Any]]:
    """Labels that are class indices of ``classes`` replaced by their position in it (the
    columns of logits restricted to ``classes``); any other label becomes -1."""
    lookup = np.full(NUM_CLASSES[IMAGENET], -1, np.int32)
    lookup[np.asarray(classes)] = np.arange(len(classes), dtype=np.int32)
    for batch in batches:
        labels = np.asarray(batch["label"])
        yield {**batch, "label": np.where(labels >= 0, lookup[np.clip(labels, 0, None)], -1)}
