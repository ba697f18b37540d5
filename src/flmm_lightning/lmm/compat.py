"""Every name this project takes from transformers outside its public API, in one place.

The project is tested with ``transformers`` in ``TESTED_TRANSFORMERS`` (pyproject.toml pins the same range).
A release that moves, renames or reshapes one of these names fails here, at import or at the first call, with
an error that names the installed version and the name; ``tests/test_compat.py`` checks each one's behaviour
in seconds. The touch points:

- the SDPA attention function and the attention-mask registry that the ``fused`` capture builds on;
- the Qwen vision attention classes and rotary functions that the packed fast path subclasses;
- Qwen's ``smart_resize``, LLaVA-NeXT's ``select_best_resolution`` and InternVL's (GOT-OCR2's)
  ``get_optimal_tiled_canvas``, to size an image without processing it;
- the processors' private token counts (``_get_num_multimodal_tokens``, ``_get_unpadded_features``);
- the registry of the outputs a model can record (``_CAN_RECORD_REGISTRY``), which unpickling skips.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import transformers
from torch import nn

TESTED_TRANSFORMERS = ">=5.24,<5.25"


class TransformersAPIError(RuntimeError):
    """A transformers name outside its public API is missing or no longer behaves as this project needs."""


def api_error(name: str, problem: str) -> TransformersAPIError:
    return TransformersAPIError(
        f"transformers {transformers.__version__}: {name} {problem}. flmm-lightning is tested with "
        f"transformers{TESTED_TRANSFORMERS}; install that (pip install 'transformers{TESTED_TRANSFORMERS}') "
        "or adapt src/flmm_lightning/lmm/compat.py"
    )


try:
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.image_processing_utils import select_best_resolution
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    from transformers.models.qwen3_vl import modeling_qwen3_vl
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
except ImportError as error:
    raise api_error(error.name or "a module", f"cannot be imported ({error})") from error

__all__ = [
    "TESTED_TRANSFORMERS",
    "Qwen2VLVisionAttention",
    "Qwen2_5_VLVisionAttention",
    "Qwen3VLVisionAttention",
    "TransformersAPIError",
    "num_image_tokens",
    "optimal_tiled_canvas",
    "qwen2_5_vl_rotary",
    "qwen2_vl_rotary",
    "qwen3_vl_rotary",
    "register_sdpa_like_attention",
    "restore_output_recording",
    "sdpa_attention_forward",
    "select_best_resolution",
    "smart_resize",
    "unpadded_features",
]

# The vision attention of each Qwen family and its ``apply_rotary_pos_emb_vision``: the packed fast path
# (``packed_attention.PackedVisionAttention``) subclasses the class, reads its ``qkv``, ``proj``,
# ``num_heads`` and ``scaling``, and keeps its forward signature
# ``(hidden_states, cu_seqlens, position_embeddings)``.
Qwen2VLVisionAttention = modeling_qwen2_vl.VisionAttention
qwen2_vl_rotary = modeling_qwen2_vl.apply_rotary_pos_emb_vision
Qwen2_5_VLVisionAttention = modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention
qwen2_5_vl_rotary = modeling_qwen2_5_vl.apply_rotary_pos_emb_vision
Qwen3VLVisionAttention = modeling_qwen3_vl.Qwen3VLVisionAttention
qwen3_vl_rotary = modeling_qwen3_vl.apply_rotary_pos_emb_vision


def register_sdpa_like_attention(name: str, forward: Callable[..., Any]) -> None:
    """Registers ``forward`` as attention implementation ``name``, with the masks SDPA gets (None for a plain
    causal batch, else boolean ``[B, 1, Q, K]``): without a mask entry the model would build no mask at all
    for an implementation it does not know."""
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def num_image_tokens(processor: Any, height: int, width: int) -> int:
    """How many placeholder tokens ``processor`` gives a ``height`` x ``width`` image, without processing
    pixels (the processor's private ``_get_num_multimodal_tokens``)."""
    name = f"{type(processor).__name__}._get_num_multimodal_tokens"
    try:
        counts = processor._get_num_multimodal_tokens(image_sizes=[[height, width]])
        return int(counts["num_image_tokens"][0])
    except (AttributeError, KeyError, TypeError, IndexError) as error:
        raise api_error(name, f"failed ({error!r})") from error


def unpadded_features(
    processor: Any, height: int, width: int, patches: int, scale_height: int, scale_width: int
) -> tuple[int, int]:
    """LLaVA-NeXT's any-res token count of a ``height`` x ``width`` image, padding removed: (cells, rows),
    from a ``scale_height`` x ``scale_width`` arrangement of crops of ``patches`` x ``patches`` (the
    processor's private ``_get_unpadded_features``)."""
    name = f"{type(processor).__name__}._get_unpadded_features"
    try:
        cells, rows = processor._get_unpadded_features(
            height, width, patches, patches, scale_height, scale_width
        )
    except (AttributeError, TypeError, ValueError) as error:
        raise api_error(name, f"failed ({error!r})") from error
    return int(cells), int(rows)


def optimal_tiled_canvas(image_processor: Any, height: int, width: int) -> tuple[int, int]:
    """The (rows, columns) of tiles that InternVL's image processor (``GotOcr2ImageProcessor`` with
    ``crop_to_patches``) cuts a ``height`` x ``width`` image into, between its ``min_patches`` and
    ``max_patches`` tiles (GOT-OCR2's ``get_optimal_tiled_canvas``, which returns columns first)."""
    size = image_processor.size
    try:
        columns, rows = get_optimal_tiled_canvas(
            (height, width),
            (size.height, size.width),
            image_processor.min_patches,
            image_processor.max_patches,
        )
    except (AttributeError, TypeError, ValueError) as error:
        raise api_error("get_optimal_tiled_canvas", f"failed ({error!r})") from error
    return int(rows), int(columns)


def restore_output_recording(model: nn.Module) -> None:
    """Registers every Hugging Face model inside ``model`` in transformers' registry of recordable outputs.

    ``PreTrainedModel.__init__`` does that; unpickling (``ddp_spawn`` workers, dataloader copies) skips it,
    and without the registration ``output_hidden_states=True`` returns None in the new process."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            try:
                _CAN_RECORD_REGISTRY[module] = module._can_record_outputs
            except AttributeError as error:
                name = f"{type(module).__name__}._can_record_outputs"
                raise api_error(name, f"is missing ({error})") from error
