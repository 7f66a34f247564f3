"""Tokenizers: bytes (the default, nothing to train), characters, and BPE through Hugging Face ``tokenizers``.

All three save as a ``tokenizer.json`` in Hugging Face's own format, which ``tokenizers`` (and so
``transformers``) encodes to the very ids jaxllm does: bytes as a byte-level BPE with no merges (id =
the byte), characters as a BPE with no merges (id = the character's place in the alphabet), and
jaxllm's special tokens as its added tokens, after the base vocabulary. Beside it, ``jaxllm_tokenizer.json``
keeps what only jaxllm reads (:data:`SIDE`): the kind, which added tokens are jaxllm's special tokens
(so that chat content encoded with :meth:`Tokenizer.encode_ordinary` cannot forge them), the special
tokens' roles and the chat template. :func:`load` reads both back; a ``tokenizer.json`` from the Hub
(no side file) loads with the roles (bos, eos, pad, unk) and the Jinja chat template of the
``tokenizer_config.json`` (or ``chat_template.jinja``) beside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from jaxllm.core.errors import ConfigError, DataError
from jaxllm.core.fileio import atomic_write, read_json, read_text

FILENAME = "tokenizer.json"
CONFIG = "tokenizer_config.json"  # Hugging Face's: special tokens and the chat template
TEMPLATE = "chat_template.jinja"  # where transformers >= 4.43 saves the chat template
SIDE = "jaxllm_tokenizer.json"  # jaxllm's own fields: kind, special tokens, roles, chat template
FILES = (SIDE, FILENAME)  # what save() writes, in the order a copy should place them (tokenizer.json last)
ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
EOD = "<|endoftext|>"  # the end-of-document token build() guarantees (GPT-2's name for it)


class Tokenizer:
    """``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``save(dir)``."""

    kind: str

    def __init__(self, special: Sequence[str] = ()):
        self.special = list(special)
        self.chat_template: str | None = None  # a Hugging Face tokenizer's Jinja template (jaxllm.data.chat_template)
        self.roles: dict[str, str] = {}  # {"bos_token": "<s>", ...}: the special tokens a Hugging Face tokenizer names

    @property
    def base_size(self) -> int:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.base_size + len(self.special)

    def token_id(self, special: str) -> int:
        return self.base_size + self.special.index(special)

    @property
    def eod_id(self) -> int | None:
        """The id written after every document of a prepared corpus; None if this tokenizer has none."""
        return self.token_id(EOD) if EOD in self.special else None

    def with_special(self, tokens: Iterable[str]) -> Tokenizer:
        """A copy that also knows ``tokens`` (appended; existing ids never move)."""
        new = [t for t in tokens if t not in self.special]
        out = self._copy()
        out.special = self.special + new
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        """Text to ids, special-token markers in the text read as the plain characters they are: what
        untrusted content (a chat message) goes through, so it cannot forge a special token."""
        return self._encode(text)

    def encode(self, text: str) -> list[int]:
        """Text to ids; special tokens written literally in the text are recognised (a prompt written
        in the chat template by whoever controls it; untrusted text goes through :meth:`encode_ordinary`)."""
        if not self.special:
            return self._encode(text)
        ids: list[int] = []
        rest = text
        while rest:
            hits = [(rest.find(s), s) for s in self.special if s in rest]
            if not hits:
                ids += self._encode(rest)
                break
            pos, tok = min(hits, key=lambda h: (h[0], -len(h[1])))
            ids += self._encode(rest[:pos]) + [self.token_id(tok)]
            rest = rest[pos + len(tok) :]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; an id of no token (a padded row) is dropped as ``transformers`` drops it."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if i < self.base_size:
                run.append(i)
            elif i < self.base_size + len(self.special):
                out += [self._decode(run), self.special[i - self.base_size]]
                run = []
        out.append(self._decode(run))
        return "".join(out)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def save(self, directory: Path) -> None:
        """``tokenizer.json`` (Hugging Face's format) and the side file, each written atomically
        (a unique temporary: processes may race)."""
        side = {"kind": self.kind, "special": self.special, "roles": self.roles, "chat_template": self.chat_template}
        atomic_write(Path(directory) / SIDE, json.dumps(side, indent=2))
        atomic_write(Path(directory) / FILENAME, self._to_json())

    def hf_tokenizer(self):
        """A ``tokenizers.Tokenizer`` that encodes and decodes as this one does, the special tokens
        as its added tokens at their jaxllm ids."""
        from tokenizers import AddedToken

        tok = self._hf_base()
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in self.special])
        for s in self.special:
            if tok.token_to_id(s) != self.token_id(s):
                raise DataError(
                    f"the special token {s!r} is also an ordinary token of the vocabulary; it has no single id"
                )
        return tok

    def _to_json(self) -> str:
        return self.hf_tokenizer().to_str()

    # Subclasses implement these.
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _hf_base(self):
        raise NotImplementedError

    def _copy(self) -> Tokenizer:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: 256 ids, any text, no training."""

    kind = "byte"

    @property
    def base_size(self) -> int:
        return 256

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        if self.special:
            return super().encode_array(text)
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def _decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def _hf_base(self):
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {ch: b for b, ch in enumerate(byte_alphabet())}
        tok = _Tok(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    def _copy(self) -> ByteTokenizer:
        return ByteTokenizer(self.special)


class CharTokenizer(Tokenizer):
    """One id per distinct character of the training corpus (nanoGPT's shakespeare_char)."""

    kind = "char"

    def __init__(self, chars: str, special: Sequence[str] = ()):
        super().__init__(special)
        self.chars = chars
        self._index = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def base_size(self) -> int:
        return len(self.chars)

    def _encode(self, text: str) -> list[int]:
        try:
            return [self._index[ch] for ch in text]
        except KeyError as e:
            raise ConfigError(f"character {e.args[0]!r} is not in the char tokenizer's vocabulary") from None

    def encode_array(self, text: str) -> np.ndarray:
        if self.special:
            return super().encode_array(text)
        table = np.full(0x110000, -1, dtype=np.int32)  # one slot per Unicode code point
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        ids = table[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
        if (ids < 0).any():
            self._encode(text)  # raises, naming the unknown character
        return ids.astype(np.int64)

    def _decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def _hf_base(self):
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models

        tok = _Tok(models.BPE(vocab={ch: i for i, ch in enumerate(self.chars)}, merges=[]))
        tok.decoder = decoders.Fuse()  # the characters, joined with nothing between them
        return tok

    def _copy(self) -> CharTokenizer:
        return CharTokenizer(self.chars, self.special)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (byte-level BPE when trained here), with the special
    tokens and chat template of its ``tokenizer_config.json`` when it came with one."""

    kind = "bpe"

    def __init__(self, tok, special: Sequence[str] = (), roles: dict | None = None, chat_template: str | None = None):
        super().__init__(special)
        self.tok = tok
        self.roles = dict(roles or {})
        self.chat_template = chat_template

    @property
    def eod_id(self) -> int | None:
        """The tokenizer's own eos token when it names one, else ``EOD`` where its vocabulary has it."""
        for i in (self.role_id("eos_token"), self.tok.token_to_id(EOD)):
            if i is not None:
                return i
        return super().eod_id

    def role_id(self, role: str) -> int | None:
        """The id of the special token named ``role`` (``"eos_token"``, ...), None if there is none."""
        return self.tok.token_to_id(self.roles[role]) if role in self.roles else None

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text``, special tokens recognised (as ``transformers`` tokenizes a rendered chat
        template), and each token's ``(start, end)`` characters in ``text``."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = _Tok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def base_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def _hf_base(self):
        from tokenizers import Tokenizer as _Tok

        return _Tok.from_str(self.tok.to_str())

    def _copy(self) -> HFTokenizer:
        return HFTokenizer(self.tok, self.special, self.roles, self.chat_template)


def byte_alphabet() -> list[str]:
    """The character byte-level BPE writes for each byte 0..255 (GPT-2's table: printable bytes stand
    for themselves, the others for the code points from 256 on, in byte order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(moved)) for b in range(256)]


def load(path: str | Path) -> Tokenizer:
    """Loads a ``tokenizer.json`` (a file, or a directory holding one): jaxllm's (with its side file)
    or any Hugging Face one."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    tree = read_json(path, "tokenizer file")
    side_path = path.parent / SIDE
    if not side_path.is_file():
        return HFTokenizer(_parse(tree, path), (), *_hf_config(path.parent))
    side = read_json(side_path, "jaxllm tokenizer file")
    special, kind = _strings(side, "special", side_path), side.get("kind")
    roles, template = side.get("roles") or {}, side.get("chat_template")
    if not (isinstance(roles, dict) and all(isinstance(v, str) for v in roles.values())):
        raise DataError(f"{side_path}: 'roles' must map role names to token strings")
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer(special)
    elif kind == "char":
        tok = CharTokenizer(_alphabet(tree, path), special)
    elif kind == "bpe":
        tree["added_tokens"] = [t for t in tree.get("added_tokens") or [] if t.get("content") not in special]
        tok = HFTokenizer(_parse(tree, path), special)
    else:
        raise DataError(f"{side_path}: 'kind' must be byte, char or bpe, got {kind!r}")
    tok.roles, tok.chat_template = dict(roles), template if isinstance(template, str) else None
    return tok


def _parse(tree: dict, path: Path):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` tree; a one-line DataError if it is none."""
    from tokenizers import Tokenizer as _Tok

    try:
        return _Tok.from_str(json.dumps(tree))
    except Exception as e:  # noqa: BLE001  (the tokenizers library raises its own exception types)
        raise DataError(f"{str(path)!r} is not a valid tokenizer.json: {' '.join(str(e).split())[:200]}") from None


def _alphabet(tree: dict, path: Path) -> str:
    """A char tokenizer's characters in id order, read off its ``tokenizer.json``'s vocabulary."""
    vocab = (tree.get("model") or {}).get("vocab") if isinstance(tree.get("model"), dict) else None
    ok = isinstance(vocab, dict) and all(isinstance(k, str) and len(k) == 1 for k in vocab)
    if not ok or sorted(vocab.values()) != list(range(len(vocab))):
        raise DataError(f"tokenizer file {path}: a char tokenizer's vocabulary must map single characters to 0..n-1")
    return "".join(sorted(vocab, key=vocab.__getitem__))


def _token(value: object, where: Path, key: str) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string, or an AddedToken's dict."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise DataError(f"{where}: {key!r} must be a token string, got {value!r}")


def _hf_config(directory: Path) -> tuple[dict[str, str], str | None]:
    """The special tokens and chat template of a Hugging Face ``tokenizer_config.json`` (and
    ``chat_template.jinja``) in ``directory``; none when it has neither."""
    config = read_json(directory / CONFIG, "tokenizer config") if (directory / CONFIG).is_file() else {}
    roles = {k: t for k in ROLES if (t := _token(config.get(k), directory / CONFIG, k)) is not None}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is the chat template
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if (directory / TEMPLATE).is_file():
        template = read_text(directory / TEMPLATE, "chat template")
    if template is not None and not isinstance(template, str):
        raise DataError(f"{directory / CONFIG}: 'chat_template' must be a Jinja template string")
    return roles, template


def _strings(tree: dict, key: str, path: Path) -> list[str]:
    """``tree[key]`` (absent: empty), which must be a list of strings."""
    value = tree.get(key, [])
    if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        raise DataError(f"tokenizer file {path}: {key!r} must be a list of non-empty strings")
    return value


def build(spec: str, train_texts: Iterable[str], bpe_vocab_size: int) -> Tokenizer:
    """The tokenizer named by ``data.tokenizer``, trained on ``train_texts`` where it needs training
    (read once, as a stream), with an end-of-document id (:attr:`Tokenizer.eod_id`): byte and char
    tokenizers append ``EOD`` after their ids, a trained BPE reserves it as a special token, a loaded
    tokenizer uses its eos token or ``EOD`` when it has one and appends ``EOD`` otherwise."""
    if spec == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif spec == "char":
        chars: set[str] = set()
        for text in train_texts:
            chars.update(text)
        tok = CharTokenizer("".join(sorted(chars)))
    elif spec == "bpe":
        tok = HFTokenizer.train(train_texts, bpe_vocab_size - 1)
        tok.tok.add_special_tokens([EOD])  # the last id of the vocabulary, as in GPT-2
    elif spec.endswith(".json") or Path(spec).is_dir():
        tok = load(spec)
    else:
        raise ConfigError(f"data.tokenizer={spec!r} is unknown; use byte, char, bpe or a path to a tokenizer.json")
    return tok if tok.eod_id is not None else tok.with_special([EOD])
