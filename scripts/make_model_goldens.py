"""Write the model parity goldens under tests/goldens/model/ from the transformers reference.

Made with transformers 5.23.0 and torch 2.14.1 (CPU, fp32) by:

    cd /work/main && .venv/bin/python scripts/make_model_goldens.py

For each tiny configuration of tests/tiny_configs.py (A, B) it builds the reference
Ernie4_5_VLMoeForConditionalGeneration with seeded random weights (tests/helpers/reference.py),
rounds them to bf16 and save_pretrained()s them to tests/goldens/model/<name>/ (Baidu tensor
names, as real checkpoints have them). It reloads that directory in fp32 and records, for every
input case of tests/helpers/reference.py, the inputs (ids, token types, grids, labels, mask), the
reference 3D positions and rope_deltas, the logits of the first VOCAB_KEPT vocabulary entries at
every position, the full logits of the last position, and loss / aux_loss
(<name>/outputs.safetensors + <name>/outputs.json). Pixels are not stored: make_pixels()
regenerates them bit for bit; the JSON keeps their sum as a check. Total size stays under 2 MB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import save_file  # noqa: E402

from tests.helpers.reference import CASES, build_reference, make_inputs, reference_forward  # noqa: E402

OUT = ROOT / "tests" / "goldens" / "model"
VOCAB_KEPT = 64
SEED = 0


def _case_record(ref, case: str) -> tuple[dict[str, torch.Tensor], dict]:
    inputs = make_inputs(case, seed=SEED)
    out = reference_forward(ref, inputs)
    positions, deltas = ref.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"), inputs.get("attention_mask"))
    tensors = {f"{case}.{k}": v.contiguous() for k, v in inputs.items() if not k.startswith("pixel_values")}
    tensors[f"{case}.position_ids"] = positions.contiguous()
    tensors[f"{case}.rope_deltas"] = deltas.contiguous()
    tensors[f"{case}.logits_head"] = out.logits[..., :VOCAB_KEPT].contiguous()
    tensors[f"{case}.logits_last"] = out.logits[:, -1].contiguous()
    pixels = {k: float(v.double().sum()) for k, v in inputs.items() if k.startswith("pixel_values")}
    record = {"loss": out.loss.item(), "aux_loss": out.aux_loss.item(), "pixel_sums": pixels}
    return tensors, record


def make(name: str) -> None:
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    target = OUT / name
    target.mkdir(parents=True, exist_ok=True)
    build_reference(name, seed=SEED).to(torch.bfloat16).save_pretrained(target)
    ref = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(target, dtype=torch.float32).eval()
    tensors, records = {}, {}
    for case in CASES:
        t, r = _case_record(ref, case)
        tensors.update(t)
        records[case] = r
    save_file(tensors, str(target / "outputs.safetensors"))
    import transformers
    meta = {"made_by": "scripts/make_model_goldens.py", "transformers": transformers.__version__,
            "torch": torch.__version__, "seed": SEED, "vocab_kept": VOCAB_KEPT, "cases": records}
    (target / "outputs.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    for config_name in ("A", "B"):
        make(config_name)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")
