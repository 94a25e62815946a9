"""Two tiny reference configurations (transformers' nested form) that differ in every structural knob.

Token ids match the tiny test tokenizer (tests/helpers/tokenizer.py): <unk> 0, <|begin_of_sentence|> 1,
<|end_of_sentence|> 2, <|IMAGE_PLACEHOLDER|> 3, <|IMAGE_START|> 4, <|IMAGE_END|> 5,
<|VIDEO_START|> 6, <|VIDEO_END|> 7, <|VIDEO_PLACEHOLDER|> 8. Vocabulary 1024.
"""

TOKEN_IDS = dict(image_token_id=3, image_start_token_id=4, image_end_token_id=5,
                 video_start_token_id=6, video_end_token_id=7, video_token_id=8)

# A: GQA 2:1, head_dim 16, 4 experts top-2, 1 shared expert, dense first, mrope (3,3,2),
#    vision depth 2 width 32.
CONFIG_A = dict(
    text_config=dict(
        vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rms_norm_eps=1e-5, use_bias=False, tie_word_embeddings=True,
        moe_intermediate_size=[32, 16], moe_k=2, moe_num_experts=4, moe_num_shared_experts=1,
        mlp_layer_types=["dense", "sparse", "sparse"],
        rope_parameters=dict(rope_type="default", rope_theta=500000.0, mrope_section=[3, 3, 2]),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                       spatial_merge_size=2, temporal_merge_size=2, rms_norm_eps=1e-6),
    tie_word_embeddings=True,
    **TOKEN_IDS,
)

# B: GQA 6:1, head_dim 12, 6 experts top-3, 2 shared experts, sparse/dense interleaved,
#    mrope (2,2,2), untied lm_head, vision depth 3 width 48.
CONFIG_B = dict(
    text_config=dict(
        vocab_size=1024, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=1, head_dim=12, max_position_embeddings=4096,
        rms_norm_eps=1e-6, use_bias=False, tie_word_embeddings=False,
        moe_intermediate_size=[24, 20], moe_k=3, moe_num_experts=6, moe_num_shared_experts=2,
        mlp_layer_types=["sparse", "dense", "sparse", "sparse"],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 2]),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    vision_config=dict(depth=3, hidden_size=48, intermediate_size=72, num_heads=4, patch_size=14,
                       spatial_merge_size=2, temporal_merge_size=2, rms_norm_eps=1e-6),
    tie_word_embeddings=False,
    **TOKEN_IDS,
)

CONFIGS = {"A": CONFIG_A, "B": CONFIG_B}
