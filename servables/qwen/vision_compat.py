"""Qwen2.5-VL preprocessing entry points that also work where torchvision cannot be imported.

Production code calls the stock pieces, exactly as the Qwen2.5-VL reference does:

* ``load_processor(path)`` is ``AutoProcessor.from_pretrained(path)``;
* ``process_vision_info(messages)`` is ``qwen_vl_utils.process_vision_info``.

With CPU torch 2.13 no torchvision wheel works (PyPI only has CUDA builds), and both stock pieces
need it only for *video*:

* transformers' ``Qwen2_5_VLProcessor`` insists on a torchvision video processor. Without
  torchvision we fall back to `Qwen25VLImageOnlyProcessor`: the same processor class minus the
  video processor (tokenizer + the PIL image processor ``AutoImageProcessor`` picks by itself).
  Chat template, image-token expansion, ``mm_token_type_ids`` and decoding are the stock code.
* qwen-vl-utils does ``import torchvision`` at module level but its image path is PIL only. We
  import it with a throwaway stub module held in ``sys.modules`` only during that import, so that
  transformers' own ``is_torchvision_available()`` checks are never fooled. Video inputs then fail.

When torchvision is importable, both functions are the unmodified stock calls.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

__all__ = ["Qwen25VLImageOnlyProcessor", "load_processor", "process_vision_info"]


def _torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


class Qwen25VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (which needs torchvision).

    transformers 5.x requires ``video_processor`` to be a torchvision-backed ``VideoProcessorMixin``;
    everything else (chat template, image-token expansion, ``mm_token_type_ids``, decoding) is the
    stock class.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = None


def load_processor(path: str | Any, **kwargs: Any) -> Any:
    """``AutoProcessor.from_pretrained(path)``; the image-only processor where torchvision is missing."""
    try:
        return AutoProcessor.from_pretrained(path, **kwargs)
    except (ImportError, AttributeError):
        # ImportError: "Qwen2VLVideoProcessor requires the Torchvision library ...";
        # AttributeError: VIDEO_PROCESSOR_MAPPING without torchvision. Anything else is a real error.
        if _torchvision_available():
            raise
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)  # the PIL class without torchvision
    return Qwen25VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      chat_template=tokenizer.chat_template)


_process_vision_info: Callable[..., Any] | None = None
_STUB_NAMES = ("torchvision", "torchvision.io", "torchvision.transforms")


def _import_qwen_vl_utils_with_stub() -> types.ModuleType:
    """Import qwen_vl_utils with a stub torchvision present only for the duration of the import."""
    stub = types.ModuleType("torchvision")
    stub.__version__ = "0.0.0+stub"
    stub.io = types.ModuleType("torchvision.io")  # type: ignore[attr-defined]
    stub.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]

    class InterpolationMode:  # referenced by the video path only
        BICUBIC = "bicubic"

    stub.transforms.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    saved = {name: sys.modules.get(name) for name in _STUB_NAMES}
    sys.modules.update({"torchvision": stub, "torchvision.io": stub.io, "torchvision.transforms": stub.transforms})
    try:
        for name in [m for m in sys.modules if m == "qwen_vl_utils" or m.startswith("qwen_vl_utils.")]:
            del sys.modules[name]  # drop a half-imported package from the failed first attempt
        return importlib.import_module("qwen_vl_utils")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


_resolve_lock = threading.Lock()  # Worker request threads call in parallel; the stubbed import must run once


def _resolve_process_vision_info() -> Callable[..., Any]:
    global _process_vision_info
    with _resolve_lock:
        return _resolve_locked()


def _resolve_locked() -> Callable[..., Any]:
    global _process_vision_info
    if _process_vision_info is None:
        try:
            from qwen_vl_utils import process_vision_info as real
        except ImportError as exc:
            if "torchvision" not in str(exc):
                raise
            real = _import_qwen_vl_utils_with_stub().process_vision_info
        _process_vision_info = real
    return _process_vision_info


def process_vision_info(messages: Any, *args: Any, **kwargs: Any) -> Any:
    """``qwen_vl_utils.process_vision_info`` (image inputs work without torchvision; video needs it)."""
    return _resolve_process_vision_info()(messages, *args, **kwargs)
