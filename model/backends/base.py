"""The backend interface: the operations the architecture asks for, in plain torch.

``Backend`` is what a device without a backend of its own runs (MPS, meta; CUDA's backend adds
nothing yet), and the reference every other backend matches: a backend subclasses it and
overrides the operations it runs faster, falling back to ``super()`` where its kernels do not
apply. The architecture never tests CPU features or device types; it calls ``self.backend.<op>``
on the backend ``model.backends.select_backend`` picked for its device, once, when the module was
built or loaded.

Operations (legend: N = tokens, H = hidden, K = experts per token, E = experts, I = expert width,
B = batch, Hq / Hkv = query / key-value heads, T = queries, S = key slots, D = head dim):

- ``linear(x, weight, bias)``: ``F.linear``; every projection of the decoder, vision tower and
  resampler (``model.backends.Linear``), and the experts of a bank kept as stacked weights;
- ``experts(bank, x, experts, weights)``: a MoE layer's routed expert products for one bank, the
  weighted sum over each token's K chosen SwiGLU experts, (N, H) -> (N, H). ``bank`` answers
  ``num_experts``, ``gate_up(x, e)`` (n, H) -> (n, 2I) and ``down(h, e)`` (n, I) -> (n, H);
- ``modality_moe(moe, x, vision_mask)``: a whole MoE layer at once (CUDA: both banks through one
  fused kernel), or None to let the layer split tokens by modality and call ``experts``;
- ``attention(q, k, v, mask, causal)``: ``F.scaled_dot_product_attention`` with grouped heads,
  where causal aligns the T queries with the *last* T of the S key slots;
- ``rotate_vision(x, cos, sin)``: the vision tower's half-wise RoPE;
- ``quant_linear(x, qw, bias)``: a product with an int8 / int4 weight (model/quantize.py's
  ``QuantLinear`` and quantized expert banks);
- ``vocab_logits(hidden, weight, packed)``: the projection to the vocabulary;
- ``parallel_parts()`` / ``map_parts(fn, parts)``: how many independent parts of a batch (the
  pictures of a prefill) are worth running at once, and ``[fn(part) for part in parts]`` run so.

Load time (``model/checkpoint/loading.py`` asks): ``maps_weights`` (weights may stay views of
the memory-mapped files), ``packs(dtype)`` / ``pack(model)`` / ``pack_experts(experts)`` /
``pack_weight(w)`` (lay weights out in the backend's own format), ``expert_bank(pairs, packed)``
(a bank over per-expert weights read in place or packed), ``loaded(model)`` (once the weights
are in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Up to this many (token, expert) slots (decode) a bank runs each chosen expert on views of its
# weights, grouped on the host; above it (prefill), slots are sorted by expert into segments. No
# path gathers (copies) expert weights: at batch 1 that would double the bytes read per token.
GATHER_MAX_SLOTS = 16


class Backend:
    """Plain torch operations for one device kind (see the module docstring)."""

    name = "torch"
    maps_weights = False

    def __init__(self, device_type: str = "cpu"):
        self.device_type = device_type

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device_type!r})"

    def __deepcopy__(self, memo) -> "Backend":
        return self  # stateless: a copied model shares its device's backend

    # --- operations -------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K), weight (N, K), bias (N,) or None -> (..., N)."""
        return F.linear(x, weight, bias)

    def experts(self, bank, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H), experts / weights (N, K) -> sum_k weights[n, k] * expert_{experts[n, k]}(x[n]), (N, H)."""
        N, K = experts.shape
        flat = experts.reshape(-1)  # (S,) with S = N*K: slot n*K + k is token n's k-th choice
        if flat.numel() <= GATHER_MAX_SLOTS:
            y = _grouped(bank, x, flat.tolist(), K)
        else:
            y = _segmented(bank, x, flat, K)
        # weighted sum over each token's K slots as one batched product: (N, 1, K) @ (N, K, H)
        # sums in fp32 and rounds once (a product then a sum rounds every product first)
        return torch.bmm(weights.unsqueeze(1).to(y.dtype), y.view(N, K, -1)).squeeze(1)  # (N, H)

    def modality_moe(self, moe, x: torch.Tensor, vision_mask: torch.Tensor | None):
        """A whole MoE layer (``model.moe.ModalityMoE``) in one go: x (B, T, H), vision_mask (B, T)
        bool or None -> (out (B, T, H), router logits (B*T, E) fp32), or None where this backend has
        no such kernel: the layer then splits the tokens by modality and asks ``experts`` per bank."""
        return None

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                  causal: bool = False) -> torch.Tensor:
        """q (B, Hq, T, D), k / v (B, Hkv, S, D), Hq a multiple of Hkv -> (B, Hq, T, D).

        mask: bool (B|1, 1, T|1, S), True where a query may see a key; it wins over ``causal``.
        causal (mask None): query t sees key slots 0 .. S - T + t (the new tokens are the last T).
        """
        T, S = q.shape[2], k.shape[2]
        causal = causal and mask is None and T > 1  # one query aligned to the end sees every slot
        if causal and T < S:  # SDPA's own causal flag would align the queries with the first keys
            mask, causal = end_aligned_causal_mask(T, S, q.device), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def rotate_vision(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x (N, ..., D) half-wise with cos / sin (N, D); math in fp32, the result in x's dtype."""
        return rotate_vision_torch(x, cos, sin)

    def quant_linear(self, x: torch.Tensor, qw, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) times an int8 / int4 weight (model/backends/qformat.py ``QuantizedWeight``, (N, K)),
        + bias -> (..., N) in x's dtype: here the weight dequantized, then ``F.linear``."""
        return F.linear(x, qw.dequantize(x.dtype), bias)

    def vocab_logits(self, hidden: torch.Tensor, weight: torch.Tensor,
                     packed: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, H) -> logits (B, T, V); ``packed``: the weight in this backend's layout, or None."""
        return self.linear(hidden, weight)

    def parallel_parts(self) -> int:
        """Independent parts of a batch worth running at once (1: one after another)."""
        return 1

    def map_parts(self, fn, parts: list) -> list:
        """``[fn(part) for part in parts]`` (a backend may run the parts at once; see ``parallel_parts``)."""
        return [fn(part) for part in parts]

    # --- load time --------------------------------------------------------------------------

    def packs(self, dtype: torch.dtype) -> bool:
        """Whether a load in ``dtype`` should lay the weights out in this backend's format."""
        return False

    def pack(self, model, release=None):
        """Lay a loaded model's weights out for this backend (in place); ``release()`` after each weight."""
        return model

    def pack_experts(self, experts) -> None:
        """Lay one expert bank (``model.moe.Experts``) out for this backend."""

    def pack_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """One (N, K) weight in this backend's layout (what ``pack`` does to every weight)."""
        return weight

    def expert_bank(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], packed: bool = False):
        """A bank (see ``experts``) over one (gate_up (2I, H), down (H, I)) pair per expert: tensors
        kept as they are (views of the mapped checkpoint, ``maps_weights``) or, packed, pairs of
        ``pack_weight`` results. Only a backend that maps or packs weights builds one."""
        raise NotImplementedError(f"the {self.name} backend keeps expert weights stacked")

    def loaded(self, model) -> None:
        """Runs once a model's weights are in place on this backend's device."""


def end_aligned_causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(1, 1, T, S) bool: query t sees key slots 0 .. S - T + t."""
    slots = torch.arange(S, device=device)
    return (slots[None, :] <= torch.arange(S - T, S, device=device)[:, None])[None, None]


# --- the expert dispatch of Backend.experts --------------------------------------------------------

def _act(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # (n, I) each
    return F.silu(gate) * up


def _swiglu(bank, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e on x (n, H) -> (n, H)."""
    return bank.down(_act(bank.gate_up(x, e)), e)


def _grouped(bank, x: torch.Tensor, flat: list[int], K: int) -> torch.Tensor:
    """Few slots (decode): each distinct chosen expert runs once on the tokens that chose it."""
    y = x.new_empty(len(flat), x.shape[-1])  # (S, H)
    slots_of: dict[int, list[int]] = {}
    for s, e in enumerate(flat):
        slots_of.setdefault(e, []).append(s)
    for e, slots in slots_of.items():
        if len(slots) == 1:
            s = slots[0]
            y[s:s + 1] = _swiglu(bank, x[s // K:s // K + 1], e)
        else:
            idx = torch.tensor(slots, device=x.device)
            y[idx] = _swiglu(bank, x[idx // K], e)
    return y


def _segmented(bank, x: torch.Tensor, flat: torch.Tensor, K: int) -> torch.Tensor:
    """Many slots (prefill): sort slots by expert, one matmul per contiguous segment.

    The segments' outputs land in sorted order by plain slice copies, and one row gather puts
    them back in slot order: indexed writes (``y[idx] = ...``) and ``x[idx]`` ran at about a
    third of the speed of ``index_select`` and contiguous copies (1024-token prefill: ~25 ms
    per layer against ~10).
    """
    order = torch.argsort(flat, stable=True)  # (S,)
    counts = torch.bincount(flat, minlength=bank.num_experts).tolist()  # one host sync
    rows = x.index_select(0, order // K)  # (S, H): sorted slot s holds token order[s] // K
    ys = torch.empty_like(rows)  # (S, H), sorted order
    start = 0
    for e, n in enumerate(counts):
        if n:
            ys[start:start + n] = _swiglu(bank, rows[start:start + n], e)
            start += n
    del rows
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)  # slot -> its sorted place
    return ys.index_select(0, inverse)


# --- RoPE in torch ops (the CPU kernels check themselves against these) -----------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) on the two halves of the last dim."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rotate_vision_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rotate_vision`` in torch ops: x*cos + rotate_half(x)*sin in fp32, as x's dtype."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)  # (N, 1, ..., D)
    x32 = x.float()
    return (x32 * cos.view(shape)).add_(rotate_half(x32).mul_(sin.view(shape))).to(x.dtype)
