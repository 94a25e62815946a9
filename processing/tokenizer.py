"""ERNIE's tokenizer: `tokenizer.json` (run by the `tokenizers` library) plus the named special
tokens of `tokenizer_config.json`.

A converted (transformers-format) ERNIE 4.5 VL checkpoint names its multimodal tokens in
`tokenizer_config.json`: `image_token` (the per-patch placeholder), `image_start_token`,
`image_end_token`, `video_token`, `video_start_token`, `video_end_token`, either at the top level
or under `model_specific_special_tokens` (or as a dict-valued `extra_special_tokens`). `<think>` and
`</think>` are listed among `extra_special_tokens`. All ids are looked up in the vocabulary, never
assumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from model.errors import ProcessorError

MULTIMODAL_TOKEN_NAMES = (
    "image_token", "image_start_token", "image_end_token", "video_token", "video_start_token", "video_end_token",
)
_STANDARD_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")
THINK_START, THINK_END = "<think>", "</think>"


def _content(token: Any) -> str | None:
    """A special token as saved: a plain string or a serialized AddedToken ({"content": ...})."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or ProcessorError saying what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProcessorError(f"missing {path.name} in {path.parent} (needed for the {what})",
                             hint="use a transformers-format ERNIE 4.5 VL checkpoint (it ships tokenizer.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProcessorError(f"{path} is not valid JSON ({e}); the {what} cannot be read",
                             hint="re-download the file") from None
    if not isinstance(data, dict):
        raise ProcessorError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


class ErnieTokenizer:
    """Encode/decode text and know ERNIE's special tokens.

    Special tokens are the added tokens marked special in tokenizer.json plus every token that
    tokenizer_config.json names (bos/eos/unk/pad/..., extra_special_tokens, the multimodal names);
    `decode(skip_special_tokens=True)` drops exactly these, as transformers does.
    """

    def __init__(self, backend, config: dict[str, Any], generation_eos: Iterable[int] = ()):
        from tokenizers import AddedToken

        self._backend = backend
        self.config = config
        self.named_tokens = self._named_tokens(config)
        required = [self.named_tokens[k] for k in MULTIMODAL_TOKEN_NAMES if k in self.named_tokens]
        missing = sorted({t for t in required + self._extra_list(config) if backend.token_to_id(t) is None})
        if missing:
            raise ProcessorError(f"tokenizer_config.json names special tokens {missing} that tokenizer.json's vocabulary "
                                 "lacks", hint="tokenizer.json and tokenizer_config.json come from different checkpoints")
        specials = [t for t in list(self.named_tokens.values()) + self._extra_list(config)
                    if backend.token_to_id(t) is not None]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)])
        self.special_ids = frozenset(backend.token_to_id(t) for t in specials) | frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        self._generation_eos = tuple(generation_eos)

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, directory: str | Path) -> "ErnieTokenizer":
        from tokenizers import Tokenizer

        directory = Path(directory)
        tok_path = directory / "tokenizer.json"
        if not tok_path.is_file():
            hint = "this checkpoint has Baidu's original files only; use the revision with transformers-format " \
                   "files (for baidu/ERNIE-4.5-VL-28B-A3B-PT: --revision refs/pr/10)"
            if not (directory / "tokenizer.model").is_file():
                hint = "point at a transformers-format ERNIE 4.5 VL checkpoint directory"
            raise ProcessorError(f"no tokenizer.json in {directory}", hint=hint)
        try:
            backend = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise ProcessorError(f"{tok_path} could not be loaded by the tokenizers library ({e})",
                                 hint="re-download tokenizer.json") from None
        config = read_json(directory / "tokenizer_config.json", "tokenizer")
        gen_path = directory / "generation_config.json"
        eos = read_json(gen_path, "generation config").get("eos_token_id") if gen_path.is_file() else None
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        return cls(backend, config, eos_ids)

    @staticmethod
    def _named_tokens(config: dict[str, Any]) -> dict[str, str]:
        named: dict[str, str] = {}
        extra = config.get("extra_special_tokens")
        for source in (extra if isinstance(extra, dict) else {}, config.get("model_specific_special_tokens") or {}, config):
            for name in _STANDARD_NAMES + MULTIMODAL_TOKEN_NAMES:
                token = _content(source.get(name))
                if token is not None:
                    named[name] = token
        return named

    @staticmethod
    def _extra_list(config: dict[str, Any]) -> list[str]:
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        return [t for t in (_content(x) for x in extra) if t is not None]

    # --- text <-> ids ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special-token strings inside it become their ids; no BOS added)."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, keep: Iterable[int] = ()) -> str:
        """Text of `ids`. With skip_special_tokens, special tokens are dropped except those in `keep`."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            keep = set(keep)
            ids = [i for i in ids if i not in self.special_ids or i in keep]
        return self._backend.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.id_to_token(i) for i in ids]

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    # --- named ids -------------------------------------------------------------------------------

    def token_id(self, name: str) -> int:
        """Id of a named token ("image_token", "eos_token", ...); ProcessorError when unnamed."""
        token = self.named_tokens.get(name)
        if token is None:
            raise ProcessorError(f"tokenizer_config.json does not name a {name}; found names {sorted(self.named_tokens)}",
                                 hint="use a transformers-format ERNIE 4.5 VL checkpoint")
        return self._backend.token_to_id(token)

    def token(self, name: str) -> str:
        self.token_id(name)
        return self.named_tokens[name]

    @property
    def bos_token_id(self) -> int | None:
        return self._optional_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._optional_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        pad = self._optional_id("pad_token")
        return pad if pad is not None else self._optional_id("unk_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the tokenizer's eos plus generation_config.json's, in order, unique."""
        ids = ([self.eos_token_id] if self.eos_token_id is not None else []) + list(self._generation_eos)
        return tuple(dict.fromkeys(ids))

    @property
    def think_start_id(self) -> int | None:
        return self._backend.token_to_id(THINK_START)

    @property
    def think_end_id(self) -> int | None:
        return self._backend.token_to_id(THINK_END)

    @property
    def multimodal_ids(self) -> dict[str, int]:
        """{"image_token_id": ..., "image_start_token_id": ..., ...} for the six multimodal tokens."""
        return {f"{name}_id": self.token_id(name) for name in MULTIMODAL_TOKEN_NAMES}

    def _optional_id(self, name: str) -> int | None:
        token = self.named_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)
