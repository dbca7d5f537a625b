"""Configurations of the released SDXL base components (diffusers/transformers format).

Used where a full-size model is needed without weights: the meta-device layout
check of a release `mask.bin` (140 attention processors) and, later, the
random-weight full-size bundles for timing. Values are those of
stabilityai/stable-diffusion-xl-base-1.0's `unet/config.json` and of the
CLIP ViT-H/14 image encoder used by StoryMaker.
"""

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

CLIP_VIT_H14 = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
    image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
)
