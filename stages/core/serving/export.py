"""The trained image encoder (backbone + head) as ONNX, checked against PyTorch with onnxruntime.

The graph takes ``images`` (B x 3 x S x S, normalised as the evaluation transform leaves them; B dynamic)
and returns ``embeddings`` (B x D, or B x K x D for a set head). The check runs the same real images through
both and fails above :data:`TOLERANCE`. onnx and onnxruntime are an optional extra (``pip install -e .[export]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import LangdmlError
from stages.core.io import atomic_path

TOLERANCE = 1e-4
OPSET = 17


def export_onnx(model: Any, image_size: int, out: Path, check_inputs: np.ndarray) -> float:
    """Write ``out`` and return the largest absolute difference between onnxruntime and PyTorch on
    ``check_inputs`` (N x 3 x S x S); above :data:`TOLERANCE` nothing is kept and it is an error."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
    except ImportError:
        raise LangdmlError("ONNX export needs onnx and onnxruntime: pip install -e '.[export]'") from None
    import torch

    model = model.cpu().eval()
    dummy = torch.zeros(2, 3, image_size, image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.onnx.export(
            model,
            (dummy,),
            str(tmp),
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        with torch.inference_mode():
            expected = model(torch.from_numpy(check_inputs)).numpy()
        got = session.run(None, {"images": check_inputs})[0]
        diff = float(np.abs(got - expected).max())
        if not diff <= TOLERANCE:
            raise LangdmlError(f"the ONNX model differs from PyTorch by {diff:.2e} (> {TOLERANCE:g}); nothing written")
    return diff


def check_batch(model: Any, image_size: int, files: Sequence[Path]) -> np.ndarray:
    """Real images as the model sees them at evaluation (N x 3 x S x S float32)."""
    import torch
    from PIL import Image

    from stages.core.data.torch_dataset import to_rgb
    from stages.core.data.transforms import eval_transform

    transform = eval_transform(image_size, model.mean, model.std)
    batch = []
    for f in files:
        try:
            with Image.open(f) as im:
                batch.append(transform(to_rgb(im)))
        except OSError as err:
            raise LangdmlError(f"cannot read image {f}: {err}") from None
    return torch.stack(batch).numpy()
