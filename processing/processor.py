"""Conversation -> model inputs: the chat format, the tokenizer, and the image/video processors.

Each `<|IMAGE_PLACEHOLDER|>` in a prompt stands for one picture and becomes t*h*w / merge**2 image
tokens (t, h, w: the picture's grid in 14-pixel patches, merge 2, so t*h*w/4); each
`<|VIDEO_PLACEHOLDER|>` becomes t*h*w / (merge**2 * temporal) video tokens (t*h*w/8). Because
placeholders are added tokens (the tokenizer never merges them with neighbours), expanding the
token ids gives the same ids as expanding the text first.

Token types, as the model wants them:
  mm_token_type_ids      1 on image tokens, 2 on video tokens, 0 elsewhere (3D positions);
  moe_mm_token_type_ids  the same plus the start/end tokens around each picture (1) or video (2):
                         they are routed to the vision experts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from model.errors import MediaError, ModelNotFoundError, ProcessorError
from processing.chat_format import collect_media, render_chat
from processing.tokenizer import ErnieTokenizer, read_json

_PROCESSOR_FILES = ["*.json", "*.jinja", "*.ttf", "*.otf", "tokenizer.model"]


class ModelInputs(dict):
    """Tensors for `ErnieVL.forward(**inputs)`; side information rides along as attributes.

    prompts: the rendered prompt per row (before placeholder expansion);
    video_timestamps: per video, the time in seconds of each sampled frame (for --json output).
    """

    def __init__(self, *args, prompts: list[str] | None = None, video_timestamps: list[list[float]] | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts = prompts or []
        self.video_timestamps = video_timestamps or []

    def to(self, device=None, dtype=None) -> "ModelInputs":
        """Move tensors to `device`; floating tensors (pixels) also to `dtype` when given."""
        moved = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
                 for k, v in self.items()}
        return ModelInputs(moved, prompts=self.prompts, video_timestamps=self.video_timestamps)


class ErnieVLProcessor:
    """Builds ERNIE 4.5 VL inputs from conversations or prompt strings, and decodes token ids."""

    def __init__(self, tokenizer: ErnieTokenizer, image_config, video_config):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.video_config = video_config
        ids = tokenizer.multimodal_ids
        self.image_token_id, self.video_token_id = ids["image_token_id"], ids["video_token_id"]
        self.image_start_token_id, self.image_end_token_id = ids["image_start_token_id"], ids["image_end_token_id"]
        self.video_start_token_id, self.video_end_token_id = ids["video_start_token_id"], ids["video_end_token_id"]

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, revision: str | None = None) -> "ErnieVLProcessor":
        """Load from a checkpoint directory, or a Hugging Face repo id (downloads the small files only)."""
        from processing.image import ImageProcessorConfig
        from processing.video import VideoProcessorConfig

        directory = _resolve(path_or_repo_id, revision)
        tokenizer = ErnieTokenizer.from_dir(directory)
        if not all(n in tokenizer.named_tokens for n in ("image_token", "video_token", "image_start_token")):
            raise ProcessorError(
                f"tokenizer_config.json in {directory} does not name the multimodal tokens (image_token, "
                f"video_token, ...); found names {sorted(tokenizer.named_tokens)}",
                hint="use the transformers-format files (for baidu/ERNIE-4.5-VL-28B-A3B-PT: --revision refs/pr/10)")
        image_raw, video_raw = _processor_dicts(directory)
        try:
            image_cfg = ImageProcessorConfig.from_dict(image_raw)
            video_cfg = VideoProcessorConfig.from_dict(video_raw, base_dir=directory)
        except (TypeError, ValueError, KeyError) as e:
            raise ProcessorError(f"the processor configs in {directory} cannot be read ({type(e).__name__}: {e})",
                                 hint="re-download preprocessor_config.json / processor_config.json") from None
        return cls(tokenizer, image_cfg, video_cfg)

    # --- conversations ---------------------------------------------------------------------------

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, tokenize: bool = True,
                            return_dict: bool = True, return_tensors: str | None = "pt",
                            enable_thinking: bool | None = False, *, fps: float | None = None,
                            num_frames: int | None = None, max_frames: int | None = None,
                            min_pixels: int | None = None, max_pixels: int | None = None,
                            video_min_pixels: int | None = None, video_max_pixels: int | None = None,
                            padding_side: str = "left"):
        """Render `messages` (one conversation, or a list of them) and, by default, build model inputs.

        tokenize=False returns the prompt string(s). return_dict=False returns only input_ids.
        fps / num_frames / max_frames steer video frame sampling (a per-item "fps" etc. wins);
        min_pixels / max_pixels bound picture sizes, video_min_pixels / video_max_pixels video frames.
        """
        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = list(messages) if batched else [messages]
        prompts = [render_chat(c, add_generation_prompt, enable_thinking) for c in conversations]
        if not tokenize:
            return prompts if batched else prompts[0]
        images, videos = [], []
        sampling = dict(fps=fps, num_frames=num_frames, max_frames=max_frames)
        for conversation in conversations:
            for item in collect_media(conversation):
                if item.kind == "image":
                    images.append(item.source)
                else:
                    videos.append(_VideoSource(item.source, {**sampling, **_sampling_options(item.options)}))
        inputs = self(text=prompts, images=images or None, videos=videos or None, return_tensors=return_tensors,
                      padding_side=padding_side, min_pixels=min_pixels, max_pixels=max_pixels,
                      video_min_pixels=video_min_pixels, video_max_pixels=video_max_pixels)
        if return_dict:
            return inputs
        ids = inputs["input_ids"]
        return ids if batched or return_tensors == "pt" else ids[0]

    # --- prompt strings -> inputs ----------------------------------------------------------------

    def __call__(self, text: str | Sequence[str], images: Sequence | None = None, videos: Sequence | None = None,
                 return_tensors: str | None = "pt", padding_side: str = "left", min_pixels: int | None = None,
                 max_pixels: int | None = None, video_min_pixels: int | None = None,
                 video_max_pixels: int | None = None) -> ModelInputs:
        """Tokenize prompt(s) holding one placeholder per picture / video, expand the placeholders.

        images: PIL images, paths, URLs or bytes, in prompt order across the batch. videos:
        `DecodedVideo`s, sources (decoded with the checkpoint's sampling), or lists of frames.
        Rows are padded on `padding_side` with the pad token; attention_mask marks real tokens.
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ProcessorError("no prompt text given; expected a string or a list of strings")
        image_batch = self._images(images, min_pixels, max_pixels) if images else None
        video_batch = self._videos(videos, video_min_pixels, video_max_pixels) if videos else None
        rows = self._expanded_rows(texts, image_batch, video_batch)
        data = self._pad(rows, padding_side)
        if image_batch is not None:
            data["pixel_values"], data["image_grid_thw"] = image_batch.pixel_values, image_batch.image_grid_thw
        if video_batch is not None:
            data["pixel_values_videos"] = video_batch.pixel_values_videos
            data["video_grid_thw"] = video_batch.video_grid_thw
        timestamps = list(video_batch.timestamps) if video_batch is not None else []
        if return_tensors != "pt":
            data = {k: v.tolist() for k, v in data.items()}
        return ModelInputs(data, prompts=texts, video_timestamps=timestamps)

    def image_token_count(self, grid_thw: Sequence[int]) -> int:
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // self.image_config.merge_size ** 2

    def video_token_count(self, grid_thw: Sequence[int]) -> int:
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // (self.video_config.merge_size ** 2 * self.video_config.temporal_patch_size)

    def mm_token_type_ids(self, ids: Sequence[int]) -> list[int]:
        kinds = {self.image_token_id: 1, self.video_token_id: 2}
        return [kinds.get(i, 0) for i in ids]

    def moe_mm_token_type_ids(self, ids: Sequence[int]) -> list[int]:
        kinds = {self.image_token_id: 1, self.image_start_token_id: 1, self.image_end_token_id: 1,
                 self.video_token_id: 2, self.video_start_token_id: 2, self.video_end_token_id: 2}
        return [kinds.get(i, 0) for i in ids]

    # --- media -----------------------------------------------------------------------------------

    def load_video(self, source: Any, fps: float | None = None, num_frames: int | None = None,
                   max_frames: int | None = None):
        """A `DecodedVideo` from a path/URL/bytes (sampled per the config), or from a list of frames."""
        from processing.video import DecodedVideo, load_video

        if isinstance(source, DecodedVideo):
            return source
        if isinstance(source, (list, tuple)):
            return _frames_video(source, fps)
        return load_video(source, self.video_config, fps=fps, num_frames=num_frames, max_frames=max_frames)

    def _images(self, images: Sequence, min_pixels: int | None, max_pixels: int | None):
        import torch

        from processing.image import ImageBatch, load_image, preprocess_images
        from processing.media_cache import MEDIA_CACHE

        cfg = _bounded(self.image_config, min_pixels, max_pixels)
        shape = ("image", repr(cfg))
        parts = [MEDIA_CACHE.get_or_make(s, shape, lambda s=s: preprocess_images([load_image(s)], cfg),
                                         lambda b: _nbytes(b.pixel_values)) for s in images]
        # new tensors (torch.cat copies): a cached entry is never handed out to be changed
        return ImageBatch(pixel_values=torch.cat([b.pixel_values for b in parts]),
                          image_grid_thw=torch.cat([b.image_grid_thw for b in parts]))

    def _videos(self, videos: Sequence, min_pixels: int | None, max_pixels: int | None):
        import torch

        from processing.media_cache import MEDIA_CACHE
        from processing.video import VideoBatch, preprocess_videos

        cfg = _bounded(self.video_config, min_pixels, max_pixels)
        parts = []
        for v in videos:
            source, options = (v.source, v.options) if isinstance(v, _VideoSource) else (v, {})
            shape = ("video", repr(self.video_config), repr(cfg), repr(sorted(options.items())))  # sampling, sizing
            parts.append(MEDIA_CACHE.get_or_make(
                source, shape, lambda source=source, options=options: preprocess_videos(
                    [self.load_video(source, **options)], cfg), lambda b: _nbytes(b.pixel_values_videos)))
        return VideoBatch(pixel_values_videos=torch.cat([b.pixel_values_videos for b in parts]),
                          video_grid_thw=torch.cat([b.video_grid_thw for b in parts]),
                          timestamps=[list(t) for b in parts for t in b.timestamps])

    # --- token ids -------------------------------------------------------------------------------

    def _expanded_rows(self, texts: list[str], image_batch, video_batch) -> list[list[int]]:
        image_counts = [self.image_token_count(g) for g in image_batch.image_grid_thw.tolist()] if image_batch else []
        video_counts = [self.video_token_count(g) for g in video_batch.video_grid_thw.tolist()] if video_batch else []
        rows = self.tokenizer.encode_batch(texts)
        n_image_slots = sum(r.count(self.image_token_id) for r in rows)
        n_video_slots = sum(r.count(self.video_token_id) for r in rows)
        if n_image_slots != len(image_counts) or n_video_slots != len(video_counts):
            raise ProcessorError(
                f"the prompt has {n_image_slots} picture and {n_video_slots} video placeholders but "
                f"{len(image_counts)} pictures and {len(video_counts)} videos were given",
                hint="give one picture per <|IMAGE_PLACEHOLDER|> and one video per <|VIDEO_PLACEHOLDER|>, in order")
        image_iter, video_iter = iter(image_counts), iter(video_counts)
        return [self._expand(row, image_iter, video_iter) for row in rows]

    def _expand(self, row: list[int], image_counts, video_counts) -> list[int]:
        out: list[int] = []
        for token in row:
            if token == self.image_token_id:
                out.extend([token] * next(image_counts))
            elif token == self.video_token_id:
                out.extend([token] * next(video_counts))
            else:
                out.append(token)
        return out

    def _pad(self, rows: list[list[int]], side: str) -> dict:
        import torch

        if side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', found {side!r}")
        pad = self.tokenizer.pad_token_id or 0
        width = max(len(r) for r in rows)
        columns: dict[str, list[list[int]]] = {k: [] for k in
                                               ("input_ids", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids")}
        for row in rows:
            n = width - len(row)
            fields = (row, [1] * len(row), self.mm_token_type_ids(row), self.moe_mm_token_type_ids(row))
            fills = (pad, 0, 0, 0)
            for key, values, fill in zip(columns, fields, fills):
                columns[key].append([fill] * n + values if side == "left" else values + [fill] * n)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in columns.items()}

    # --- ids -> text -----------------------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(_as_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in _as_list(batch)]


# --- helpers ---------------------------------------------------------------------------------------

def _as_list(ids) -> list:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


@dataclass(frozen=True)
class _VideoSource:
    """A video to decode in ``_videos`` (where the decoded result may come from the media cache),
    with the sampling options of its message."""

    source: Any
    options: dict


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size() + 256  # and a little for the rest of the entry


def _bounded(cfg, min_pixels: int | None, max_pixels: int | None):
    changes = {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    if changes and changes.get("min_pixels", cfg.min_pixels) > changes.get("max_pixels", cfg.max_pixels):
        raise MediaError(f"min_pixels {changes.get('min_pixels', cfg.min_pixels)} exceeds max_pixels "
                         f"{changes.get('max_pixels', cfg.max_pixels)}", hint="lower min_pixels or raise max_pixels")
    return replace(cfg, **changes) if changes else cfg


def _sampling_options(options: dict) -> dict:
    return {k: options[k] for k in ("fps", "num_frames", "max_frames") if options.get(k) is not None}


def _frames_video(frames: Sequence, fps: float | None):
    """A video given as its frames (PIL images or HxWx3 uint8 arrays), all used, `fps` (default 1)."""
    import numpy as np

    from processing.video import DecodedVideo

    if not frames:
        raise MediaError("a video given as a list of frames has no frames", hint="pass at least one frame")
    try:
        arrays = [np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f, dtype=np.uint8) for f in frames]
        stacked = np.stack(arrays)
    except ValueError as e:
        raise MediaError(f"the frames of a video differ in size or shape ({e})",
                         hint="give frames of one size, as PIL images or HxWx3 uint8 arrays") from None
    if stacked.ndim != 4 or stacked.shape[-1] != 3:
        raise MediaError(f"video frames have shape {tuple(stacked.shape[1:])}; expected (height, width, 3)")
    rate = float(fps or 1.0)
    n = len(stacked)
    return DecodedVideo(frames=stacked, indices=list(range(n)), timestamps=[i / rate for i in range(n)], fps=rate,
                        duration=n / rate, total_frames=n)


def _processor_dicts(directory: Path) -> tuple[dict, dict]:
    """(image processor dict, video processor dict): split files win over nested processor_config.json."""
    nested_path = directory / "processor_config.json"
    nested = read_json(nested_path, "processor") if nested_path.is_file() else {}
    image_path, video_path = directory / "preprocessor_config.json", directory / "video_preprocessor_config.json"
    image = read_json(image_path, "image processor") if image_path.is_file() else nested.get("image_processor")
    video = read_json(video_path, "video processor") if video_path.is_file() else nested.get("video_processor")
    if image is None:
        raise ProcessorError(f"no image processor config in {directory}: expected preprocessor_config.json or an "
                             "'image_processor' entry in processor_config.json",
                             hint="use a transformers-format ERNIE 4.5 VL checkpoint")
    if video is None:
        video = {k: v for k, v in image.items() if k in ("image_mean", "image_std", "rescale_factor", "patch_size",
                                                          "merge_size")}
    if image.get("merge_size", 2) != video.get("merge_size", 2) or image.get("patch_size", 14) != video.get(
            "patch_size", 14):
        raise ProcessorError(f"the image and video processor configs in {directory} disagree on patch/merge size "
                             f"({image.get('patch_size')}/{image.get('merge_size')} vs "
                             f"{video.get('patch_size')}/{video.get('merge_size')})",
                             hint="the files come from different checkpoints; re-download them")
    return image, video


def _resolve(path_or_repo_id: str | Path, revision: str | None) -> Path:
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_repo_id).startswith((".", "/", "~")) or str(path_or_repo_id).count("/") != 1:
        raise ProcessorError(f"{path_or_repo_id} is not a checkpoint directory",
                             hint="give a directory holding tokenizer.json, or a Hugging Face repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=_PROCESSOR_FILES))
    except Exception as e:  # hub errors come in many types; all mean "not found / not reachable"
        raise ModelNotFoundError(f"could not fetch the processor files of {path_or_repo_id} "
                                 f"(revision {revision or 'main'}): {type(e).__name__}: {e}",
                                 hint="check the repo id and your connection, or pass a local directory") from None
