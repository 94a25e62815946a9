"""The `ernie` command: thin Typer commands over the engine, and the one error boundary in main().

Nothing heavy is imported at module level: `ernie --help` and `ernie --version` never load torch.
Every flag can also be set through an ERNIE_* environment variable (shown in --help).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ernie_cli import __version__
from ernie_cli.settings import (DEFAULT_HINT, DEFAULT_MODEL, DEVICES, DTYPES, GENERATION_THREAD, QUANTIZATIONS,
                                GenerationSettings, LoadOptions, MediaOptions)

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
def _in_bounds(name: str):
    """A callback that refuses values outside settings.BOUNDS[name] as a usage error (exit 2), before anything loads."""

    def check(value):
        from ernie_cli.settings import range_problem

        problem = range_problem(name, value)
        if problem:
            raise typer.BadParameter(problem.replace(f"{name} must", "must"))
        return value

    return check


def _num(*names: str, env: str, help: str, panel: str = GEN):
    return _opt(*names, env=env, help=help, panel=panel, callback=_in_bounds(env.lower()))


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
MaxNew = Annotated[Optional[int], _num("--max-new-tokens", "-n", env="MAX_NEW_TOKENS",
                                       help="Answer length limit (>= 1).")]
Temp = Annotated[Optional[float], _num("--temperature", "-t", env="TEMPERATURE", help="0 = greedy (>= 0).")]
TopP = Annotated[Optional[float], _num("--top-p", env="TOP_P", help="Nucleus sampling mass, in (0, 1].")]
TopK = Annotated[Optional[int], _num("--top-k", env="TOP_K", help="Sample among the k likeliest (0 = all).")]
MinP = Annotated[Optional[float], _num("--min-p", env="MIN_P", help="Drop tokens below min_p x top prob, in [0, 1].")]
RepPen = Annotated[Optional[float], _num("--repetition-penalty", env="REPETITION_PENALTY",
                                         help=">1 discourages repeats (> 0).")]
Seed = Annotated[Optional[int], _opt("--seed", env="SEED", help="Seed for sampling.")]
Stop = Annotated[Optional[list[str]], typer.Option(
    "--stop", rich_help_panel=GEN, show_default=False, metavar="TEXT",
    help="Stop at this string (repeatable). [env var: ERNIE_STOP, one stop string per line, spaces kept: "
         "ERNIE_STOP=$'blue triangle\\nEND']")]
System = Annotated[Optional[str], _opt("--system", env="SYSTEM", help="System prompt.")]
SystemFile = Annotated[Optional[Path], _opt("--system-file", env="SYSTEM_FILE", help="System prompt from a file.")]
Think = Annotated[Optional[bool], _opt("--think/--no-think", env="THINK", help="Let the model reason first.")]
Budget = Annotated[Optional[int], _num("--thinking-budget", env="THINKING_BUDGET", help="Max reasoning tokens (>= 1).")]
HideThink = Annotated[bool, _opt("--hide-thinking", env="HIDE_THINKING", panel=OUT, help="Do not show reasoning.")]
Fps = Annotated[Optional[float], _num("--fps", env="FPS", panel=MEDIA, help="Video frames sampled per second (> 0).")]
MaxFrames = Annotated[Optional[int], _num("--max-frames", env="MAX_FRAMES", panel=MEDIA,
                                          help="Most video frames (>= 2).")]
NoStamps = Annotated[bool, _opt("--no-timestamps", env="NO_TIMESTAMPS", panel=MEDIA, help="Do not stamp times on frames.")]
MaxPixels = Annotated[Optional[int], _num("--max-pixels", env="MAX_PIXELS", panel=MEDIA,
                                          help="Resize budget per image/frame (>= 784, one 28x28 window).")]
Quiet = Annotated[bool, _opt("--quiet", "-q", env="QUIET", panel=OUT, help="Only the answer; no progress.")]
Verbose = Annotated[bool, _opt("--verbose", "-v", env="VERBOSE", panel=OUT, help="Stats on stderr.")]
AsJson = Annotated[bool, _opt("--json", env="JSON", panel=OUT, help="Print one JSON object.")]


class StdoutClosed(Exception):
    """The reader of stdout went away (`| head -1`): not an OSError, so it reaches main() past Typer."""


def _command(*args, **kwargs):
    """app.command(), with a write to a closed stdout turned into StdoutClosed (Typer would exit 1 on it)."""

    def register(function):
        @functools.wraps(function)
        def run(*a, **kw):
            try:
                return function(*a, **kw)
            except BrokenPipeError:
                raise StdoutClosed from None

        return app.command(*args, **kwargs)(run)

    return register


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"ernie {__version__}")
        except BrokenPipeError:
            raise StdoutClosed from None
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                help="Show the version and exit.")] = False) -> None:
    """Run Baidu's ERNIE 4.5 VL locally: describe images and videos, chat, manage models."""


def _settings(o: dict) -> GenerationSettings:
    stop = o["stop"]
    if not stop and os.environ.get("ERNIE_STOP"):  # one stop string per line, so a string may hold spaces
        stop = os.environ["ERNIE_STOP"].split("\n")
    return GenerationSettings(max_new_tokens=o["max_new_tokens"], temperature=o["temperature"], top_p=o["top_p"],
                              top_k=o["top_k"], min_p=o["min_p"], repetition_penalty=o["repetition_penalty"],
                              seed=o["seed"], stop=tuple(stop or ()), think=o["think"],
                              thinking_budget=o["thinking_budget"])


def _load(o: dict) -> LoadOptions:
    return LoadOptions(o["model"], o["revision"], o["device"].value, o["dtype"].value, o["offline"] or None,
                       o["server"], o["api_key"], quantize=o["quantize"] and o["quantize"].value)


def _media(o: dict) -> MediaOptions:
    return MediaOptions(o["fps"], o["max_frames"], not o["no_timestamps"], o["max_pixels"])


# Pairs of options that say the same thing two ways, or opposite things.
CONFLICTS = (("prompt", "prompt_file"), ("system", "system_file"), ("json", "jsonl"), ("quiet", "verbose"))


def _resolve_conflicts(ctx: typer.Context) -> dict:
    """ctx.params after the one rule for CONFLICTS pairs: both on the command line (or both from ERNIE_*
    variables) is a usage error (exit 2); one on the command line and one from a variable: the command line wins."""
    def source(name: str) -> str:
        value, src = ctx.params.get(name), ctx.get_parameter_source(name)
        return "" if value in (None, False) or src is None else src.name  # COMMANDLINE | ENVIRONMENT | DEFAULT...

    params = dict(ctx.params)
    for a, b in CONFLICTS:
        sa, sb = source(a), source(b)
        if not (sa and sb) or "DEFAULT" in (sa, sb):
            continue
        if sa != sb and "COMMANDLINE" in (sa, sb):
            loser = a if sb == "COMMANDLINE" else b
            params[loser] = False if isinstance(params[loser], bool) else None
            continue
        ctx.fail(f"{_flag(ctx, a)} and {_flag(ctx, b)} cannot be used together; pick one")
    return params


def _check_remote(o: dict) -> None:
    """Flags a --server cannot honour are a usage error (exit 2), before anything is sent."""
    if o.get("server") and o.get("thinking_budget") is not None:
        raise typer.BadParameter("works only with a local model; OpenAI's API has no such field",
                                 param_hint="--thinking-budget")


def _flag(ctx: typer.Context, name: str) -> str:
    param = next(p for p in ctx.command.params if p.name == name)
    from_env = ctx.get_parameter_source(name).name == "ENVIRONMENT"
    return f"{param.opts[0]} (from {param.envvar})" if from_env else param.opts[0]


@_command()
def describe(
    ctx: typer.Context,
    media: Annotated[list[str], typer.Argument(help="Images/videos: paths, http(s) URLs, or - for stdin.",
                                               show_default=False, metavar="MEDIA...")],
    prompt: Annotated[Optional[str], _opt("--prompt", "-p", env="PROMPT",
                                          help="What to ask (default: a piped stdin, else describe).")] = None,
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
    """Describe images and videos (or answer --prompt about them); the answer streams to stdout.

    Without -p or --prompt-file, the prompt is read from stdin when stdin is a pipe (echo "question" | ernie
    describe photo.jpg) or a whole file (< question.txt); never from a terminal, /dev/null, or a file a shell
    loop is reading (while read f; do ernie describe "$f"; done < list.txt). In a loop fed by a pipe, pass -p
    or </dev/null. Conflicting flags (--prompt/--prompt-file, --system/--system-file, --json/--jsonl,
    --quiet/--verbose) are a usage error; a flag on the command line wins over an ERNIE_* variable.
    """
    from ernie_cli.commands import run_describe

    o = _resolve_conflicts(ctx)
    _check_remote(o)
    fmt = "jsonl" if o["jsonl"] else "json" if o["json"] else "text"
    if each:
        from ernie_cli.each import run_describe_each

        if server:
            raise typer.BadParameter("--each runs the model here; it does not send to a --server",
                                     param_hint="--server")
        return run_describe_each(
            media, prompt=o["prompt"], prompt_file=o["prompt_file"], system=o["system"],
            system_file=o["system_file"], load=_load(o), media_options=_media(o), settings=_settings(o), fmt=fmt,
            quiet=o["quiet"], verbose=o["verbose"], batch_size=batch_size, resume=resume)
    if batch_size is not None or resume is not None:
        raise typer.BadParameter("--batch-size and --resume work with --each", param_hint="--each")
    run_describe(
        media, prompt=o["prompt"], prompt_file=o["prompt_file"], system=o["system"], system_file=o["system_file"],
        load=_load(o), media_options=_media(o), settings=_settings(o), fmt=fmt, quiet=o["quiet"],
        verbose=o["verbose"], hide_thinking=hide_thinking)


@_command()
def chat(
    ctx: typer.Context,
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
    """Chat with the model kept loaded (type /help inside). Without a terminal: one message per line, slash
    commands and triple-quote blocks as in the REPL, /exit ends it."""
    from ernie_cli.chat import run_chat

    o = _resolve_conflicts(ctx)
    _check_remote(o)
    run_chat(media or [], system=o["system"], system_file=o["system_file"], load=_load(o), media_options=_media(o),
             settings=_settings(o), quiet=o["quiet"], verbose=o["verbose"], hide_thinking=hide_thinking)


@_command()
def serve(
    model: Model = DEFAULT_MODEL, revision: Revision = None, device: Device = DeviceName.auto,
    dtype: Dtype = DtypeName.auto, quantize: Quantize = None, offline: Offline = False,
    host: Annotated[str, _opt("--host", env="HOST", panel=SERVE, help="Address to listen on (0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[int, _opt("--port", env="PORT", panel=SERVE, help="Port (0: any free one).", min=0, max=65535)] = 8000,
    api_key: Annotated[Optional[str], _opt("--api-key", env="API_KEY", panel=SERVE,
                                           help="Require this bearer key on /v1 routes.")] = None,
    max_batch: Annotated[int, _opt("--max-batch", env="MAX_BATCH", panel=SERVE,
                                   help="Most requests decoded together.", min=1)] = 16,
    queue_size: Annotated[int, _opt("--queue-size", env="QUEUE_SIZE", panel=SERVE,
                                    help="Most requests waiting; more get 503.", min=1)] = 64,
    batch_wait: Annotated[float, _opt("--batch-wait", env="BATCH_WAIT", panel=SERVE,
                                      help="Most milliseconds a request ready for the model waits for others "
                                           "still arriving, to share their prefill.", min=0.0)] = 50.0,
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

    run_serve(LoadOptions(model, revision, device.value, dtype.value, offline or None,
                          quantize=quantize and quantize.value),
              MediaOptions(fps, max_frames, not no_timestamps, max_pixels),
              ServeOptions(host, port, api_key, max_batch, queue_size, max_request_mb, grace, verbose, media_urls,
                           batch_wait_s=batch_wait / 1000))


@_command()
def pull(model: Annotated[str, typer.Argument(help="Hub repo id, e.g. baidu/ERNIE-4.5-VL-28B-A3B-PT.")],
         revision: Revision = None, quiet: Quiet = False) -> None:
    """Download a model into the standard Hugging Face cache (resumable; honours HF_TOKEN)."""
    from ernie_cli.models_cmd import run_pull

    run_pull(model, revision, quiet=quiet)


@_command("models")
def models_(json: Annotated[bool, _opt("--json", env="JSON", panel=OUT, help="Print one JSON array.")] = False) -> None:
    """List the models available offline: ernie-tiny, the Hub cache and the folders `ernie quantize` wrote."""
    from ernie_cli.models_cmd import run_models

    run_models(as_json=json)


@_command()
def rm(model: Annotated[str, typer.Argument(help="Repo id as shown by `ernie models`.")],
       yes: Annotated[bool, _opt("--yes", "-y", env="YES", panel=OUT, help="Do not ask for confirmation.")] = False) -> None:
    """Delete a model from the Hub cache, after a y or yes read from stdin (terminal or pipe); no answer deletes
    nothing. Exit 1 when nothing was removed."""
    from ernie_cli.models_cmd import run_rm

    run_rm(model, yes=yes)


@_command("quantize")
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


@_command()
def info(model: Annotated[str, typer.Argument(help="Hub repo id, checkpoint dir, or ernie-tiny.")],
         revision: Revision = None, offline: Offline = False, json: AsJson = False) -> None:
    """Summarise a model's config: sizes, parameters (total and active per token), memory per dtype."""
    from ernie_cli.models_cmd import run_info

    run_info(model, revision, offline=offline or None, as_json=json)


def main() -> None:
    """Entry point: the one error boundary (ErnieError -> `error: ...` + hint, exit 1; ERNIE_DEBUG=1 re-raises).

    A reader that goes away (`ernie ... | head -1`) ends ernie quietly with exit 0: the answer it wanted was
    delivered. Generation has stopped by then (the renderer closes the engine's stream, which joins its worker).
    """
    code = 0
    try:
        app(prog_name="ernie")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except (StdoutClosed, BrokenPipeError):
        _silence_stdout()
    except Exception as e:
        code = _report(e)
    _exit(code)


def _exit(code: int) -> None:
    """Flush and exit; where a generation thread could not be stopped (Ctrl-C during its join), leave with os._exit,
    since finalizing the interpreter under a thread that is inside torch ends in `terminate called` (SIGABRT)."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _silence_stdout()
    if any(t.name == GENERATION_THREAD and t.is_alive() for t in threading.enumerate()):
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _report(error: Exception) -> int:
    from ernie_cli.settings import debug_enabled

    errors = sys.modules.get("model.errors")  # loaded iff a library error can have been raised
    if debug_enabled() or errors is None or not isinstance(error, errors.ErnieError):
        raise error
    message = " ".join(str(error).split())
    print(f"error: {message}", file=sys.stderr)
    print(f"hint: {error.hint or DEFAULT_HINT}", file=sys.stderr)
    return 1


def _silence_stdout() -> None:
    """After the reader went away (`| head -1`), point stdout at /dev/null so the final flush is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    main()
