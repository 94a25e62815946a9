"""The embedded ERNIE 4.5 VL MoE model: tensors in, logits out, plus the decode loop."""
