"""Load a checkpoint: resolve it, read its config, build the model on meta, fill it from mmap.

Memory: each shard is memory-mapped copy-on-write and every tensor is a view of the mapping,
so a CPU load in the checkpoint's own dtype copies nothing but the stacked experts (built one
layer at a time, straight in the destination dtype). Other dtypes or devices copy tensor by
tensor; the mapping is never read whole into memory and there is no fp32 detour.

Only safetensors are read (a pickle can run code); each shard's header is checked against
the file size before any tensor is touched, so a truncated download is an error, not a crash.

The model class is not imported here: ``ErnieVL.from_pretrained`` passes its constructor in
(``build``), so imports flow from the model down to the checkpoint reader.
"""

from __future__ import annotations

import json
import mmap
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import torch
from torch import Tensor

from model.backends import Backend, select_backend
from model.checkpoint.hub import DEFAULT_REPO, resolve
from model.checkpoint.quantized import load_quantized
from model.checkpoint.weights import BANKS, PER_EXPERT_KEY, IGNORED, renamed
from model.checkpoint.weights import to_ours
from model.config import ErnieVLConfig
from model.errors import CheckpointError, ErnieError
from model.quantize import QuantSpec, quantize_model, spec_from_config

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pdparams")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
          "float": torch.float32}
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER = 100 * 1024 * 1024
# madvise(2) advice that maps a range's pages in one call (Linux 5.14+; mmap has no name for it)
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


def load_checkpoint(build: Callable, path_or_repo_id: str = DEFAULT_REPO, revision: str | None = None,
                    dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
                    offline: bool | None = None, pack: bool = True, quantize: "str | QuantSpec | None" = None):
    """The model ``build(config, device="meta")`` makes, in eval mode with the checkpoint's weights
    (see the module docstring). ``ErnieVL.from_pretrained`` is the public entry point.

    pack: lay the weights out for inference as the device's backend wants them (CPU: experts read
    in place from the mapped files, or oneDNN-packed where bf16 packing pays); False keeps plain
    trainable parameters. The backend (``model.backends.select_backend``) is picked here, once,
    and stored on the model.

    dtype: "auto" (config ``torch_dtype``/``dtype``, else the tensors'), "bfloat16", "float16",
    "float32" or a torch dtype. device: "auto" (cuda > mps > cpu), "cpu", "cuda", "mps", ...

    quantize: "int8" / "int4" (or a ``QuantSpec``) quantizes the weights while they load (on the
    CPU, module by module, the source pages dropped as it goes: see model/quantize.py), then moves
    them to the device. A checkpoint written by ``ernie quantize`` loads quantized without it
    (model/checkpoint/quantized.py).
    """
    root = resolve(path_or_repo_id, revision=revision, offline=offline)
    config = ErnieVLConfig.from_file(root / "config.json")
    spec = quantize if isinstance(quantize, QuantSpec) else QuantSpec.parse(quantize)
    stored = spec_from_config(json.loads((root / "config.json").read_text(encoding="utf-8")))
    checkpoint = SafetensorsCheckpoint.open(root)
    target_device = resolve_device(device)
    backend = select_backend(target_device)
    if stored is not None:
        if spec is not None and spec.bits != stored.bits:
            raise ErnieError(f"{root} is already quantized to {stored.name}; it cannot be loaded as {spec.name}",
                             hint=f"drop --quantize (or use {stored.name}), or quantize the original checkpoint")
        float_dtype = None if str(dtype) == "auto" else resolve_dtype(dtype, root, checkpoint)
        model = load_quantized(build, root, config, checkpoint, stored, float_dtype, target_device)
        model.use_backend(backend)
        finish_load(model, checkpoint, backend)
        return model
    target_dtype = resolve_dtype(dtype, root, checkpoint)
    # a quantizing load reads the file in place on the CPU, quantizes there, then moves to the device
    load_device = torch.device("cpu") if spec is not None else target_device
    load_backend = select_backend(load_device)
    packing = pack and spec is None and backend.packs(target_dtype)
    plan = _expert_sources(checkpoint, config) if (pack or spec is not None) and load_backend.maps_weights else None
    views = None
    if plan is not None and not packing:
        views = _expert_views(checkpoint, plan, target_dtype)
        plan = None if views is None else plan
    source = checkpoint if plan is None else _WithStandIns(checkpoint, plan, config)
    state = to_ours(source, config, dtype=target_dtype, device=load_device, release=checkpoint.release_pages)
    model = build(config, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.eval()
    model.use_backend(load_backend)
    if views is not None:
        for (i, bank), pairs in views.items():
            getattr(model.model.layers[i].mlp, f"{bank}_experts").use_bank(load_backend.expert_bank(pairs))
    elif plan is not None:
        _pack_experts_from(checkpoint, plan, model, load_backend)
    if spec is not None:
        quantize_model(model, spec, release=checkpoint.release_pages)
        model.to(target_device)  # (a no-op on the CPU)
        model.use_backend(backend)
    if packing:
        backend.pack(model, release=checkpoint.release_pages)
    finish_load(model, checkpoint, backend)
    return model


def finish_load(model, checkpoint: "SafetensorsCheckpoint", backend: Backend) -> None:
    """Where the backend reads weights in place, map in the pages of the tensors the model reads
    (copied pages were released as they went), except a quantized model's token embeddings: a
    lookup reads a few rows, which fault in on their own. Elsewhere drop every page (all was
    copied). Then the backend's ``loaded``."""
    if backend.maps_weights:
        skip = model.model.embed_tokens.weight if getattr(model, "quantization", None) is not None else None
        checkpoint.populate([t for t in (*model.parameters(), *model.buffers()) if t is not skip])
    else:
        checkpoint.release_pages()
    backend.loaded(model)



# --- dtype and device -------------------------------------------------------------------------

def resolve_dtype(dtype: str | torch.dtype, root: Path, checkpoint: "SafetensorsCheckpoint") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ErnieError(f"unknown dtype {dtype!r}; expected auto, bfloat16, float16 or float32")
        return DTYPES[dtype]
    raw = json.loads((root / "config.json").read_text(encoding="utf-8"))
    named = raw.get("torch_dtype") or raw.get("dtype") or (raw.get("text_config") or {}).get("dtype")
    if isinstance(named, str) and named.removeprefix("torch.") in DTYPES:
        return DTYPES[named.removeprefix("torch.")]
    return checkpoint.dtype_of("model.embed_tokens.weight") or torch.float32


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) != "auto":
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ErnieError("device cuda was requested but no CUDA GPU is available",
                             hint="use --device cpu (or auto)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ErnieError("device mps was requested but Metal is not available", hint="use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --- memory-mapped safetensors ----------------------------------------------------------------

class SafetensorsCheckpoint(Mapping):
    """Read-only mapping name -> tensor over one or more memory-mapped safetensors shards."""

    def __init__(self, shards: dict[str, "_Shard"]):
        self._where = shards  # tensor name -> shard holding it

    @classmethod
    def open(cls, root: Path) -> "SafetensorsCheckpoint":
        root = Path(root)
        if (root / INDEX).is_file():
            return cls(_open_index(root))
        if (root / SINGLE).is_file():
            shard = _Shard(root / SINGLE)
            return cls(dict.fromkeys(shard.entries, shard))
        files = sorted(root.glob("*.safetensors"))
        if len(files) == 1:
            shard = _Shard(files[0])
            return cls(dict.fromkeys(shard.entries, shard))
        pickles = sorted(p.name for pattern in PICKLES for p in root.glob(pattern))
        if pickles:
            raise CheckpointError(f"{root} holds only pickle weights ({', '.join(pickles[:3])}); ernie reads "
                                  "safetensors only, since loading a pickle can run arbitrary code",
                                  hint="use the repo's safetensors files, or convert the weights to safetensors")
        found = f"{len(files)} unindexed .safetensors files" if files else "no weights"
        raise CheckpointError(f"{root} has {found}; expected {SINGLE} or {INDEX} with its shards",
                              hint="point at the directory of a complete checkpoint download")

    def __getitem__(self, name: str) -> Tensor:
        return self._where[name].tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def release_pages(self, names: list[str] | None = None) -> None:
        """Drop the resident pages of ``names`` (all tensors when None) once they were copied.

        The mappings are private and never written, so a later read of a view simply faults
        the page back in from the file; this only keeps the loader's peak memory down.
        """
        if names is None:
            for shard in set(self._where.values()):
                shard.release(None)
        else:
            for name in names:
                if name in self._where:  # (stand-ins are not in the files)
                    self._where[name].release(name)

    def joined(self, first: str, second: str) -> Tensor | None:
        """One view over two 2-D tensors of one dtype and width that lie back to back in one shard
        (rows of ``first`` then rows of ``second``); None when they do not."""
        shard = self._where[first]
        if shard is not self._where[second]:
            return None
        a, b = shard.entries[first], shard.entries[second]
        if (a["dtype"] != b["dtype"] or len(a["shape"]) != 2 or len(b["shape"]) != 2
                or a["shape"][1] != b["shape"][1] or a["data_offsets"][1] != b["data_offsets"][0]):
            return None
        dtype = _ST_DTYPES[a["dtype"]]
        rows, width = a["shape"][0] + b["shape"][0], a["shape"][1]
        begin = a["data_offsets"][0]
        if rows * width == 0:
            return None
        flat = torch.frombuffer(shard.mm, dtype=dtype, count=rows * width, offset=shard.start + begin)
        return flat.view(rows, width)

    def populate(self, tensors: Iterable[Tensor]) -> None:
        """Map in, ahead of use, the pages of the tensors that are views of these files (the
        first forward would otherwise fault them in a page at a time)."""
        shards = set(self._where.values())
        for t in tensors:
            # oneDNN-packed weights are opaque copies (no storage to ask about, nothing mapped)
            if t.device.type != "cpu" or t.numel() == 0 or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            for shard in shards:
                if shard.populate(storage.data_ptr(), storage.nbytes()):
                    break

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].entries[name]["shape"])

    def dtype_of(self, name: str) -> torch.dtype | None:
        shard = self._where.get(name)
        return _ST_DTYPES.get(shard.entries[name]["dtype"]) if shard else None


def _open_index(root: Path) -> dict[str, "_Shard"]:
    try:
        weight_map = json.loads((root / INDEX).read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{root / INDEX} is not a valid shard index ({type(e).__name__}: {e})",
                              hint="re-download the checkpoint") from None
    names = sorted(set(weight_map.values()))
    absent = [n for n in names if not (root / n).is_file()]
    if absent:
        raise CheckpointError(f"{len(absent)} of {len(names)} shards listed in {INDEX} are missing: "
                              f"{', '.join(absent)}", hint="the download is incomplete; download it again")
    shards = {n: _Shard(root / n) for n in names}
    lost = [k for k, n in weight_map.items() if k not in shards[n].entries]
    if lost:
        raise CheckpointError(f"{len(lost)} tensors listed in {INDEX} are not in their shard "
                              f"({', '.join(sorted(lost)[:5])})", hint="re-download the checkpoint")
    return {k: shards[n] for k, n in weight_map.items()}


class _Shard:
    """One safetensors file: 8-byte little-endian header size, JSON header, then raw data."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(_MAX_HEADER, size - 8):
                self._corrupt(f"header size field {n} does not fit the file size {size}")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                self._corrupt(f"unreadable header ({e})")
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
        header.pop("__metadata__", None)
        self.start, self.entries = 8 + n, header
        self.base = torch.frombuffer(self.mm, dtype=torch.uint8, count=1).data_ptr() if size else 0
        for name, entry in header.items():
            self._check(name, entry, size - 8 - n)

    def _corrupt(self, what: str) -> NoReturn:
        raise CheckpointError(f"{self.path} is not a valid safetensors file: {what}",
                              hint="the file is truncated or corrupt; delete it and download it again")

    def _check(self, name: str, entry: dict, data_size: int) -> None:
        try:
            dtype = _ST_DTYPES[entry["dtype"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            count = 1
            for d in entry["shape"]:
                count *= int(d)
        except (KeyError, TypeError, ValueError) as e:
            self._corrupt(f"bad header entry for {name} ({type(e).__name__}: {e})")
        if end > data_size:
            self._corrupt(f"tensor {name} ends at byte {end} but the file has {data_size} data bytes (truncated)")
        if not 0 <= begin <= end or end - begin != count * dtype.itemsize:
            self._corrupt(f"tensor {name} has offsets [{begin}, {end}) for shape {entry['shape']} {entry['dtype']}")

    def release(self, name: str | None) -> None:
        """madvise(DONTNEED) the whole pages inside one tensor's bytes (or the whole mapping)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        if name is None:
            begin, end = 0, len(self.mm)
        else:
            lo, hi = self.entries[name]["data_offsets"]
            begin = -(-(self.start + lo) // mmap.PAGESIZE) * mmap.PAGESIZE
            end = (self.start + hi) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > begin:
            self.mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def populate(self, address: int, nbytes: int) -> bool:
        """MADV_POPULATE_READ (else WILLNEED) the pages of [address, address + nbytes) when that
        range lies in this mapping; False when it does not."""
        begin = address - self.base
        if not 0 <= begin < len(self.mm):
            return False
        begin = begin // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(self.mm), address - self.base + nbytes)
        for advice in (_MADV_POPULATE_READ, getattr(mmap, "MADV_WILLNEED", None)):
            if advice is None:
                continue
            try:
                self.mm.madvise(advice, begin, end - begin)
                break
            except OSError:  # older kernels: no POPULATE_READ
                continue
        return True

    def tensor(self, name: str) -> Tensor:
        entry = self.entries[name]
        dtype, shape = _ST_DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self.mm, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self.start + begin)  # a view of the mapping, no copy
        return flat.view(shape)


# --- packed experts straight from the checkpoint (CPU bf16) -------------------------------------

def _expert_sources(checkpoint: SafetensorsCheckpoint, config: ErnieVLConfig) -> dict | None:
    """{(layer, bank): [(gate, up, down) source names per expert]} when every per-expert tensor
    is present with its expected shape; None otherwise (the plain path then reports problems)."""
    t = config.text
    found: dict[tuple[int, int, str], str] = {}
    for key in checkpoint:
        if not IGNORED.search(key) and (m := PER_EXPERT_KEY.match(renamed(key))):
            found[(int(m[1]), int(m[2]), m[3])] = key
    if not found:
        return None
    plan, E, H = {}, t.moe_num_experts, t.hidden_size
    for i in range(t.num_hidden_layers):
        if not t.is_moe_layer(i):
            continue
        for b, (bank, I) in enumerate(zip(BANKS, t.moe_intermediate_size)):
            want = {"gate": (I, H), "up": (I, H), "down": (H, I)}
            names = [tuple(found.get((i, b * E + e, proj)) for proj in want) for e in range(E)]
            if any(n is None or checkpoint.shape_of(n) != want[proj]
                   for triple in names for n, proj in zip(triple, want)):
                return None
            plan[(i, bank)] = names
    used = {n for triple in (t for names in plan.values() for t in names) for n in triple}
    return plan if used == set(found.values()) else None


def _expert_views(checkpoint: SafetensorsCheckpoint, plan: dict, dtype: torch.dtype) -> dict | None:
    """{(layer, bank): [(gate_up (2I, H), down (H, I)) per expert]} when every expert's tensors
    already have ``dtype``, else None (the experts are then stacked). gate_up is a view of the
    file where the up rows follow the gate rows (as safetensors' name order puts them), else a
    copy; down is always a view."""
    views = {}
    for key, names in plan.items():
        pairs = []
        for gate, up, down in names:
            if any(checkpoint.dtype_of(n) != dtype for n in (gate, up, down)):
                return None
            gate_up = checkpoint.joined(gate, up)
            if gate_up is None:  # e.g. split across two shards
                gate_up = torch.cat([checkpoint[gate], checkpoint[up]])
                checkpoint.release_pages([gate, up])
            pairs.append((gate_up, checkpoint[down]))
        views[key] = pairs
    return views


class _WithStandIns(Mapping):
    """The checkpoint minus its per-expert tensors, plus zero-byte stacked stand-ins in their place
    (``to_ours`` checks names and shapes; ``_pack_experts_from`` then fills the banks)."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, plan: dict, config: ErnieVLConfig):
        self._checkpoint = checkpoint
        hidden_names = {n for names in plan.values() for triple in names for n in triple}
        self._keys = [k for k in checkpoint if k not in hidden_names]
        self._stand_ins = {}
        E, H = config.text.moe_num_experts, config.text.hidden_size
        for (i, bank), _ in plan.items():
            I = config.text.moe_intermediate_size[BANKS.index(bank)]
            p = f"model.layers.{i}.mlp.{bank}_experts"
            self._stand_ins[f"{p}.gate_up_proj"] = torch.zeros((), dtype=torch.bfloat16).expand(E, 2 * I, H)
            self._stand_ins[f"{p}.down_proj"] = torch.zeros((), dtype=torch.bfloat16).expand(E, H, I)

    def __getitem__(self, name: str) -> Tensor:
        return self._stand_ins[name] if name in self._stand_ins else self._checkpoint[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._keys
        yield from self._stand_ins

    def __len__(self) -> int:
        return len(self._keys) + len(self._stand_ins)


@torch.no_grad()
def _pack_experts_from(checkpoint: SafetensorsCheckpoint, plan: dict, model, backend: Backend) -> None:
    """Pack each expert from its checkpoint tensors (no stacked copy), releasing pages as it goes.

    Experts are packed by as many worker threads as torch uses (the packing op releases the GIL).
    """
    workers = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(workers) as pool:
        for (i, bank), names in plan.items():
            experts = getattr(model.model.layers[i].mlp, f"{bank}_experts")
            packer = _ExpertPacker(checkpoint, backend, *checkpoint.shape_of(names[0][0]))
            experts.use_bank(backend.expert_bank(list(pool.map(packer, names)), packed=True))


class _ExpertPacker:
    """(gate, up, down) source names -> packed (gate_up, down); one reused (2I, H) buffer per thread."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, backend: Backend, I: int, H: int):
        self.checkpoint, self.backend, self.I, self.H = checkpoint, backend, I, H
        self.local = threading.local()

    @torch.no_grad()
    def __call__(self, names: tuple[str, str, str]) -> tuple[Tensor, Tensor]:
        gate, up, down = names
        gate_up = getattr(self.local, "buffer", None)
        if gate_up is None:  # reused: no fresh pages to fault in per expert
            gate_up = self.local.buffer = torch.empty(2 * self.I, self.H, dtype=torch.bfloat16)  # (2I, H)
        gate_up[:self.I].copy_(self.checkpoint[gate])
        gate_up[self.I:].copy_(self.checkpoint[up])
        pair = self.backend.pack_weight(gate_up), self.backend.pack_weight(self.checkpoint[down].to(torch.bfloat16))
        self.checkpoint.release_pages([gate, up, down])
        return pair
