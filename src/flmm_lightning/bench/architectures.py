"""Released architectures the bench builds with random weights (``--size qwen2_5_vl_3b``): the FLOPs and the
memory of the real model, nothing downloaded."""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig

from flmm_lightning.assets import QWEN2_5_VL_VOCAB_SIZE


def qwen2_5_vl_3b_config() -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-3B-Instruct's architecture (its config.json): 36 layers, hidden 2048, 16 heads on 2 kv
    heads, MLP 11008; vision tower 32 blocks of width 1280 (4 with full attention), merged into 2048."""
    text_config = dict(
        vocab_size=QWEN2_5_VL_VOCAB_SIZE,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        max_window_layers=70,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        initializer_range=0.02,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    vision_config = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        hidden_act="silu",
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        out_hidden_size=2048,
        tokens_per_second=2,
        initializer_range=0.02,
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
