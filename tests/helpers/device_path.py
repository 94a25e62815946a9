"""Run the GPU decode path (model/backends/cuda) anywhere: on a CPU its Triton kernels go through
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU), the step
runs eagerly (graphs need CUDA), and the loop skips pinned memory and events."""

from __future__ import annotations

import torch

from model.generation.generate import (Done, GenerationConfig, GenerationStream, Step, _Run, default_config,
                                       prompt_positions)


def device_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    config: GenerationConfig | None = None, **inputs) -> torch.Tensor:
    """Like ``model.generation.generate.generate`` but through ``device_loop`` whatever the model's device."""
    from model.generation.device_loop import device_loop

    device = next(model.parameters()).device
    config = config or default_config(model)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    vision = {k: inputs.get(k) for k in ("mm_token_type_ids", "moe_mm_token_type_ids", "pixel_values",
                                         "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    vision = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vision.items()}
    run = _Run(input_ids, attention_mask, device)
    positions = prompt_positions(model, input_ids, attention_mask, vision["mm_token_type_ids"],
                                 vision["image_grid_thw"], vision["video_grid_thw"])
    for event in GenerationStream(device_loop(model, run, config, vision, None, positions, Step), run):
        if isinstance(event, Done):
            return event.sequences
    raise AssertionError("no Done event")
