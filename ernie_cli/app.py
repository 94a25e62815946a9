"""The `ernie` command: thin Typer commands over the engine, and the one error boundary in main().

Nothing heavy is imported at module level: `ernie --help` and `ernie --version` never load torch.
Every flag can also be set through an ERNIE_* environment variable (shown in --help).
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ernie_cli import __version__
from ernie_cli.settings import DEFAULT_MODEL, DEVICES, DTYPES, QUANTIZATIONS, GenerationSettings, LoadOptions, MediaOptions

app = typer.Typer(
    name="ernie", no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Run Baidu's ERNIE 4.5 VL locally: describe images and videos, chat, manage models.",
)

GEN, MEDIA, LOAD, OUT, SERVE = "Generation", "Media", "Model", "Output", "Server"
BATCH = "Batch (--each)"


def _opt(*names: str, env: str, help: str, panel: str = GEN, **kw):
    return typer.Option(*names, envvar=f"ERNIE_{env}", help=help, rich_help_panel=panel, show_envvar=True, **kw)


# --- shared option types ---------------------------------------------------------------------------
Model = Annotated[str, _opt("--model", "-m", env="MODEL", panel=LOAD, help="Hub repo id, checkpoint dir, or ernie-tiny.")]
Revision = Annotated[Optional[str], _opt("--revision", env="REVISION", panel=LOAD, help="Hub branch, tag or commit.")]
DeviceName = Enum("DeviceName", {d: d for d in DEVICES}, type=str)
DtypeName = Enum("DtypeName", {d: d for d in DTYPES}, type=str)
Device = Annotated[DeviceName, _opt("--device", env="DEVICE", panel=LOAD, help="Where to run.")]
Dtype = Annotated[DtypeName, _opt("--dtype", env="DTYPE", panel=LOAD, help="Weight precision.")]
QuantName = Enum("QuantName", {q: q for q in QUANTIZATIONS}, type=str)
Quantize = Annotated[Optional[QuantName], _opt("--quantize", env="QUANTIZE", panel=LOAD,
                                               help="Quantize weights while loading (weight-only int8/int4).")]
Offline = Annotated[bool, _opt("--offline", env="OFFLINE", panel=LOAD, help="Never touch the network.")]
ServerUrl = Annotated[Optional[str], _opt("--server", env="SERVER", panel=LOAD,
                                          help="Answer on this OpenAI-compatible server (ernie serve, vLLM...).")]
ApiKey = Annotated[Optional[str], _opt("--api-key", env="API_KEY", panel=LOAD, help="Bearer key for the server.")]
MaxNew = Annotated[Optional[int], _opt("--max-new-tokens", "-n", env="MAX_NEW_TOKENS", help="Answer length limit.", min=1)]
Temp = Annotated[Optional[float], _opt("--temperature", "-t", env="TEMPERATURE", help="0 = greedy.", min=0.0)]
TopP = Annotated[Optional[float], _opt("--top-p", env="TOP_P", help="Nucleus sampling mass.", min=0.0, max=1.0)]
TopK = Annotated[Optional[int], _opt("--top-k", env="TOP_K", help="Sample among the k likeliest.", min=0)]
MinP = Annotated[Optional[float], _opt("--min-p", env="MIN_P", help="Drop tokens below min_p x top prob.", min=0.0, max=1.0)]
RepPen = Annotated[Optional[float], _opt("--repetition-penalty", env="REPETITION_PENALTY",
                                         help=">1 discourages repeats.", min=0.0)]
Seed = Annotated[Optional[int], _opt("--seed", env="SEED", help="Seed for sampling.")]
Stop = Annotated[Optional[list[str]], _opt("--stop", env="STOP", help="Stop at this string (repeatable).")]
System = Annotated[Optional[str], _opt("--system", env="SYSTEM", help="System prompt.")]
SystemFile = Annotated[Optional[Path], _opt("--system-file", env="SYSTEM_FILE", help="System prompt from a file.")]
Think = Annotated[Optional[bool], _opt("--think/--no-think", env="THINK", help="Let the model reason first.")]
Budget = Annotated[Optional[int], _opt("--thinking-budget", env="THINKING_BUDGET", help="Max reasoning tokens.", min=1)]
HideThink = Annotated[bool, _opt("--hide-thinking", env="HIDE_THINKING", panel=OUT, help="Do not show reasoning.")]
Fps = Annotated[Optional[float], _opt("--fps", env="FPS", panel=MEDIA, help="Video frames sampled per second.", min=0.0)]
MaxFrames = Annotated[Optional[int], _opt("--max-frames", env="MAX_FRAMES", panel=MEDIA, help="Most video frames.", min=2)]
NoStamps = Annotated[bool, _opt("--no-timestamps", env="NO_TIMESTAMPS", panel=MEDIA, help="Do not stamp times on frames.")]
MaxPixels = Annotated[Optional[int], _opt("--max-pixels", env="MAX_PIXELS", panel=MEDIA,
                                          help="Resize budget per image/frame.", min=1)]
Quiet = Annotated[bool, _opt("--quiet", "-q", env="QUIET", panel=OUT, help="Only the answer; no progress.")]
Verbose = Annotated[bool, _opt("--verbose", "-v", env="VERBOSE", panel=OUT, help="Stats on stderr.")]
AsJson = Annotated[bool, _opt("--json", env="JSON", panel=OUT, help="Print one JSON object.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ernie {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                help="Show the version and exit.")] = False) -> None:
    """Run Baidu's ERNIE 4.5 VL locally: describe images and videos, chat, manage models."""


def _settings(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, think, budget):
    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                              stop=tuple(stop or ()), think=think, thinking_budget=budget)


@app.command()
def describe(
    media: Annotated[list[str], typer.Argument(help="Images/videos: paths, http(s) URLs, or - for stdin.",
                                               show_default=False, metavar="MEDIA...")],
    prompt: Annotated[Optional[str], _opt("--prompt", "-p", env="PROMPT", help="What to ask (default: describe).")] = None,
    prompt_file: Annotated[Optional[Path], _opt("--prompt-file", env="PROMPT_FILE", help="Read the prompt from a file.")] = None,
    model: Model = DEFAULT_MODEL, revision: Revision = None, device: Device = DeviceName.auto, dtype: Dtype = DtypeName.auto,
    quantize: Quantize = None, offline: Offline = False, server: ServerUrl = None, api_key: ApiKey = None,
    max_new_tokens: MaxNew = None, temperature: Temp = None, top_p: TopP = None,
    top_k: TopK = None, min_p: MinP = None, repetition_penalty: RepPen = None, seed: Seed = None, stop: Stop = None,
    system: System = None, system_file: SystemFile = None, think: Think = None, thinking_budget: Budget = None,
    hide_thinking: HideThink = False, fps: Fps = None, max_frames: MaxFrames = None, no_timestamps: NoStamps = False,
    max_pixels: MaxPixels = None, quiet: Quiet = False, verbose: Verbose = False, json: AsJson = False,
    jsonl: Annotated[bool, _opt("--jsonl", env="JSONL", panel=OUT, help="Stream JSON events, one per line.")] = False,
    each: Annotated[bool, _opt("--each", env="EACH", panel=BATCH,
                               help="One answer per MEDIA item, batched (- reads paths/URLs from stdin).")] = False,
    batch_size: Annotated[Optional[int], _opt("--batch-size", env="BATCH_SIZE", panel=BATCH, min=1,
                                              help="With --each: inputs generated together (default: from "
                                                   "the model and free memory).")] = None,
    resume: Annotated[Optional[Path], _opt("--resume", env="RESUME", panel=BATCH,
                                           help="With --each: skip inputs answered without error in this "
                                                ".jsonl file.")] = None,
) -> None:
    """Describe images and videos (or answer --prompt about them); the answer streams to stdout."""
    from ernie_cli.commands import run_describe

    if each:
        from ernie_cli.each import run_describe_each

        if server:
            raise typer.BadParameter("--each runs the model here; it does not send to a --server",
                                     param_hint="--server")
        return run_describe_each(
            media, prompt=prompt, prompt_file=prompt_file, system=system, system_file=system_file,
            load=LoadOptions(model, revision, device.value, dtype.value, offline or None,
                             quantize=quantize and quantize.value),
            media_options=MediaOptions(fps, max_frames, not no_timestamps, max_pixels),
            settings=_settings(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop,
                               think, thinking_budget),
            fmt="jsonl" if jsonl else "json" if json else "text", quiet=quiet, verbose=verbose,
            batch_size=batch_size, resume=resume)
    if batch_size is not None or resume is not None:
        raise typer.BadParameter("--batch-size and --resume work with --each", param_hint="--each")
    run_describe(
        media, prompt=prompt, prompt_file=prompt_file, system=system, system_file=system_file,
        load=LoadOptions(model, revision, device.value, dtype.value, offline or None, server, api_key,
                         quantize=quantize and quantize.value),
        media_options=MediaOptions(fps, max_frames, not no_timestamps, max_pixels),
        settings=_settings(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, think,
                           thinking_budget),
        fmt="jsonl" if jsonl else "json" if json else "text", quiet=quiet, verbose=verbose, hide_thinking=hide_thinking)


@app.command()
def chat(
    media: Annotated[Optional[list[str]], typer.Argument(help="Media attached to your first message.",
                                                         show_default=False, metavar="[MEDIA]...")] = None,
    model: Model = DEFAULT_MODEL, revision: Revision = None, device: Device = DeviceName.auto, dtype: Dtype = DtypeName.auto,
    quantize: Quantize = None, offline: Offline = False, server: ServerUrl = None, api_key: ApiKey = None,
    max_new_tokens: MaxNew = None, temperature: Temp = None, top_p: TopP = None,
    top_k: TopK = None, min_p: MinP = None, repetition_penalty: RepPen = None, seed: Seed = None, stop: Stop = None,
    system: System = None, system_file: SystemFile = None, think: Think = None, thinking_budget: Budget = None,
    hide_thinking: HideThink = False, fps: Fps = None, max_frames: MaxFrames = None, no_timestamps: NoStamps = False,
    max_pixels: MaxPixels = None, quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Chat with the model kept loaded (type /help inside). Without a terminal: one message per line."""
    from ernie_cli.chat import run_chat

    run_chat(
        media or [], system=system, system_file=system_file,
        load=LoadOptions(model, revision, device.value, dtype.value, offline or None, server, api_key,
                         quantize=quantize and quantize.value),
        media_options=MediaOptions(fps, max_frames, not no_timestamps, max_pixels),
        settings=_settings(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, think,
                           thinking_budget),
        quiet=quiet, verbose=verbose, hide_thinking=hide_thinking)


@app.command()
def serve(
    model: Model = DEFAULT_MODEL, revision: Revision = None, device: Device = DeviceName.auto,
    dtype: Dtype = DtypeName.auto, offline: Offline = False,
    host: Annotated[str, _opt("--host", env="HOST", panel=SERVE, help="Address to listen on (0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[int, _opt("--port", env="PORT", panel=SERVE, help="Port (0: any free one).", min=0, max=65535)] = 8000,
    api_key: Annotated[Optional[str], _opt("--api-key", env="API_KEY", panel=SERVE,
                                           help="Require this bearer key on /v1 routes.")] = None,
    max_batch: Annotated[int, _opt("--max-batch", env="MAX_BATCH", panel=SERVE,
                                   help="Most requests decoded together.", min=1)] = 16,
    queue_size: Annotated[int, _opt("--queue-size", env="QUEUE_SIZE", panel=SERVE,
                                    help="Most requests waiting; more get 503.", min=1)] = 64,
    max_request_mb: Annotated[float, _opt("--max-request-mb", env="MAX_REQUEST_MB", panel=SERVE,
                                          help="Largest request body; larger get 413.", min=0.001)] = 64.0,
    grace: Annotated[float, _opt("--grace", env="GRACE", panel=SERVE,
                                 help="Seconds answers in flight may finish after SIGTERM.", min=0.0)] = 10.0,
    media_urls: Annotated[bool, _opt("--media-urls/--no-media-urls", env="MEDIA_URLS", panel=SERVE,
                                     help="Fetch http(s) media URLs clients send (off: data: URLs only).")] = True,
    fps: Fps = None, max_frames: MaxFrames = None, no_timestamps: NoStamps = False, max_pixels: MaxPixels = None,
    verbose: Annotated[bool, _opt("--verbose", "-v", env="VERBOSE", panel=OUT, help="Log every request.")] = False,
) -> None:
    """Serve the model over OpenAI's chat API: POST /v1/chat/completions, GET /v1/models, GET /health."""
    from ernie_cli.serve import ServeOptions, run_serve

    run_serve(LoadOptions(model, revision, device.value, dtype.value, offline or None),
              MediaOptions(fps, max_frames, not no_timestamps, max_pixels),
              ServeOptions(host, port, api_key, max_batch, queue_size, max_request_mb, grace, verbose, media_urls))


@app.command()
def pull(model: Annotated[str, typer.Argument(help="Hub repo id, e.g. baidu/ERNIE-4.5-VL-28B-A3B-PT.")],
         revision: Revision = None, quiet: Quiet = False) -> None:
    """Download a model into the standard Hugging Face cache (resumable; honours HF_TOKEN)."""
    from ernie_cli.models_cmd import run_pull

    run_pull(model, revision, quiet=quiet)


@app.command("models")
def models_(json: AsJson = False) -> None:
    """List the models available offline: ernie-tiny and what is in the Hub cache."""
    from ernie_cli.models_cmd import run_models

    run_models(as_json=json)


@app.command()
def rm(model: Annotated[str, typer.Argument(help="Repo id as shown by `ernie models`.")],
       yes: Annotated[bool, _opt("--yes", "-y", env="YES", panel=OUT, help="Do not ask for confirmation.")] = False) -> None:
    """Delete a model from the Hub cache."""
    from ernie_cli.models_cmd import run_rm

    run_rm(model, yes=yes)


@app.command("quantize")
def quantize_(
    model: Annotated[str, typer.Argument(help="Hub repo id, checkpoint dir, or ernie-tiny.")],
    outdir: Annotated[Path, typer.Argument(help="Directory to write the quantized checkpoint to.")],
    bits: Annotated[int, _opt("--bits", "-b", env="QUANTIZE_BITS", panel=LOAD, help="4 or 8.", min=4, max=8)] = 4,
    group_size: Annotated[Optional[int], _opt("--group-size", env="QUANTIZE_GROUP", panel=LOAD,
                                              help="Columns per scale (default 64 for int4, 128 for int8).")] = None,
    revision: Revision = None, offline: Offline = False,
    force: Annotated[bool, _opt("--force", "-f", env="FORCE", panel=OUT, help="Replace OUTDIR if it exists.")] = False,
    quiet: Quiet = False,
) -> None:
    """Write a weight-only int8/int4 copy of a model that `--model OUTDIR` loads in seconds."""
    from ernie_cli.quantize_cmd import run_quantize

    run_quantize(model, outdir, bits=bits, group_size=group_size, revision=revision, offline=offline or None,
                 force=force, quiet=quiet)


@app.command()
def info(model: Annotated[str, typer.Argument(help="Hub repo id, checkpoint dir, or ernie-tiny.")],
         revision: Revision = None, offline: Offline = False, json: AsJson = False) -> None:
    """Summarise a model's config: sizes, parameters (total and active per token), memory per dtype."""
    from ernie_cli.models_cmd import run_info

    run_info(model, revision, offline=offline or None, as_json=json)


def main() -> None:
    """Entry point: the one error boundary (ErnieError -> `error: ...` + hint, exit 1; ERNIE_DEBUG=1 re-raises)."""
    try:
        app(prog_name="ernie")
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(0)
    except Exception as e:
        _report(e)
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()


def _report(error: Exception) -> None:
    from ernie_cli.settings import debug_enabled

    errors = sys.modules.get("model.errors")  # loaded iff a library error can have been raised
    if debug_enabled() or errors is None or not isinstance(error, errors.ErnieError):
        raise error
    message = " ".join(str(error).split())
    print(f"error: {message}", file=sys.stderr)
    if getattr(error, "hint", None):
        print(f"hint: {error.hint}", file=sys.stderr)
    sys.exit(1)


def _silence_stdout() -> None:
    """After the reader went away (`| head -1`), point stdout at /dev/null so the final flush is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    main()
