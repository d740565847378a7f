"""The fp16 file the speed benchmark needs beside its random-weight fp32 model.

``model build --also fp16`` is the way for real weights: it checks agreement with fp32 and
refuses a model that disagrees. With random weights agreement means nothing (and can fail), so
for speed alone this converts the same way export does (``keep_io_types``) and labels it fp16;
the reference check at start-up still bounds the probabilities' difference from fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from core.contract import variant_path


def ensure_fp16(fp32: Path) -> Path:
    path = variant_path(fp32, "fp16")
    if path.is_file():
        return path
    model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    props = {p.key: p.value for p in model.metadata_props}
    props |= {"precision": "fp16", "parity": "null"}
    if "reference" in props:  # the server's check keeps the difference bound, not top-1
        reference = json.loads(props["reference"])
        if "eval" in reference:
            reference["eval"]["bounds"]["fp16"]["top1_agreement"] = 0.0
        props["reference"] = json.dumps(reference)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path
