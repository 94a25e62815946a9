"""`ernie quantize MODEL OUTDIR --bits 4|8`: write a weight-only quantized checkpoint, and remember it.

Quantized checkpoints written here are recorded in ``$ERNIE_HOME/local-models.json`` so that
`ernie models` lists them beside the Hub cache (with their format and size).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from ernie_cli.modelinfo import human_bytes
from ernie_cli.settings import LoadOptions, ernie_home
from model.errors import ErnieError


def registry_path() -> Path:
    return ernie_home() / "local-models.json"


def local_models() -> list[Path]:
    """The quantized checkpoints `ernie quantize` wrote that still exist."""
    try:
        paths = json.loads(registry_path().read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return [Path(p) for p in paths if isinstance(p, str) and (Path(p) / "config.json").is_file()]


def remember(path: Path) -> None:
    paths = [str(p) for p in local_models() if p != path] + [str(path)]
    try:
        registry_path().parent.mkdir(parents=True, exist_ok=True)
        registry_path().write_text(json.dumps(paths, indent=2) + "\n", encoding="utf-8")
    except OSError:
        pass  # listing is a convenience; the checkpoint itself is written


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_quantize(model: str, outdir: Path, *, bits: int, group_size: int | None, revision: str | None,
                 offline: bool | None, force: bool, quiet: bool) -> None:
    if bits not in (4, 8):
        raise typer.BadParameter(f"{bits} is not 4 or 8", param_hint="--bits")
    if group_size is not None and (group_size < 32 or group_size & (group_size - 1)):
        raise typer.BadParameter(f"{group_size} is not a power of two >= 32", param_hint="--group-size")
    from ernie_cli.engine import resolve_model_ref
    from ernie_cli.memory import check_memory
    from model.checkpoint.hub import resolve

    root = resolve(str(resolve_model_ref(model)), revision=revision, offline=offline)
    outdir = outdir.expanduser().resolve()
    if outdir == Path(root).resolve():
        raise ErnieError(f"OUTDIR {outdir} is the model's own directory", hint="write the quantized copy elsewhere")
    check_memory(root, LoadOptions(model, device="cpu", quantize=f"int{bits}"))
    from model import load_pretrained
    from model.checkpoint.quantized import check_outdir, save_quantized
    from model.quantize import QuantSpec, spec_from_config

    stored = spec_from_config(json.loads((Path(root) / "config.json").read_text(encoding="utf-8")))
    if stored is not None:
        raise ErnieError(f"{root} is already quantized ({stored.name})", hint="quantize the original checkpoint")
    check_outdir(outdir, force)  # before minutes of quantizing
    try:
        spec = QuantSpec(bits, group_size or 0)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--group-size") from None
    start = time.perf_counter()
    if not quiet:
        print(f"quantizing {model} to {spec.name} (group {spec.group_size})…", file=sys.stderr)
    quantized = load_pretrained(str(root), device="cpu", offline=True, quantize=spec)
    save_quantized(quantized, Path(root), outdir, force=force)
    remember(outdir)
    if not quiet:
        weights, source = (sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) for d in (outdir, root))
        ratio = f" ({weights / source:.2f}x of the original's {human_bytes(source)})" if source else ""
        print(f"wrote {spec.name} (group {spec.group_size}) in {time.perf_counter() - start:.1f} s: "
              f"{human_bytes(weights)} of weights{ratio}, {human_bytes(dir_bytes(outdir))} in all; "
              f"run it with --model {outdir}", file=sys.stderr)
    print(outdir)
