"""Byte-level BPE tokenizer with one token per digit, stored as a Hugging Face `tokenizer.json`.

Pre-tokenization splits every digit into its own piece before the byte-level step, so BPE never learns a
merge that contains a digit: "12345" is always five tokens, whatever the corpus. Numbers then have a
fixed, position-aligned spelling, which is what makes digit-by-digit arithmetic learnable by a small model.

The special tokens come first in the vocabulary, in the order pad, bos, eos (ids 0, 1, 2), matching the
defaults of transformers' `JambaConfig`. A saved directory loads in transformers with
`AutoTokenizer.from_pretrained(dir)`.

Train a vocabulary from text files, one document per line:

    python -m jamba.tokenizer train --input corpus.txt --vocab-size 65536 --output path/to/dir

Limitations: `StreamDecoder` is exact and cheap for byte-level vocabularies (the kind `train_tokenizer` builds);
for others, such as the SentencePiece-style byte fallback of the released Jamba checkpoints, it decodes the whole
sequence at every token. Special-token text inside the input of `encode`
is matched as the special token, as in `tokenizers`.
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

NUM_BYTES = 256


def _byte_level_chars() -> dict[str, int]:
    """Map each character of the byte-level alphabet back to the byte it stands for.

    Byte-level BPE shows every byte as a printable character so that vocabularies stay readable. Bytes that
    are printable in Latin-1 map to themselves. The others (controls, space, soft hyphen) map to the code
    points from 256 upwards, in byte order. `tokenizers`' ByteLevel pre-tokenizer and decoder use this table.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars = {chr(b): b for b in printable}
    shifted = 0
    for b in range(NUM_BYTES):
        if b not in printable:
            chars[chr(NUM_BYTES + shifted)] = b
            shifted += 1
    return chars


_BYTE_OF_CHAR = _byte_level_chars()


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 65536,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
) -> tokenizers.Tokenizer:
    """Train a byte-level BPE vocabulary in which every digit is its own token.

    The special tokens get ids 0, 1, ... in the order given; the 256 byte tokens follow, then the merges.
    The result has at most `vocab_size` tokens: fewer when the corpus runs out of pairs seen at least
    `min_frequency` times.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of documents, got a single string")
    if isinstance(special_tokens, str) or not all(isinstance(t, str) for t in special_tokens):
        raise TypeError(f"special_tokens must be a sequence of strings, got {special_tokens!r}")
    special_tokens = tuple(special_tokens)
    if any(not t for t in special_tokens) or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
    floor = NUM_BYTES + len(special_tokens)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= floor:
        raise ValueError(
            f"vocab_size must be an integer greater than {floor} ({NUM_BYTES} byte tokens + "
            f"{len(special_tokens)} special tokens), got {vocab_size!r}"
        )
    if not isinstance(min_frequency, int) or isinstance(min_frequency, bool) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")

    tokenizer = tokenizers.Tokenizer(models.BPE())
    # Digits are split off one at a time before the byte-level regex runs, so no pre-token, and therefore
    # no merge, contains a digit next to anything else.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    logger.info("trained a byte-level BPE vocabulary of %s tokens", tokenizer.get_vocab_size())
    return tokenizer


def _token_name(value: object) -> str | None:
    """Return the token text of a `tokenizer_config.json` entry, a plain string or `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the names of its pad, bos and eos tokens.

    `encode` adds no special tokens unless `add_bos=True`, which puts bos first. The files written by
    `save` load in transformers and encode identically, because the vocabulary has no post-processor that
    would add special tokens there.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        pad_token: str = PAD_TOKEN,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
    ) -> None:
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        self.backend = backend
        self.pad_token = pad_token
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._token_bytes: list[bytes] | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` from a directory or a file path.

        When a `tokenizer_config.json` sits next to it, the pad, bos and eos token names come from there.
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        names: dict[str, str] = {}
        config_file = file.parent / TOKENIZER_CONFIG_FILE
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            for key in ("pad_token", "bos_token", "eos_token"):
                name = _token_name(config.get(key))
                if name is not None:
                    names[key] = name
        return cls(tokenizers.Tokenizer.from_file(str(file)), **names)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} not found in the vocabulary")
        return token_id

    @property
    def pad_id(self) -> int:
        return self.token_id(self.pad_token)

    @property
    def bos_id(self) -> int:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.eos_token)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_prompt(self, text: str) -> list[int]:
        """Encode a prompt as the model was trained to see it: with the special tokens that tokenizer.json's post
        processor adds (the released Jamba tokenizers add BOS; the project's trained ones add nothing)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = self._checked_ids(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        vocab_size = self.vocab_size
        for i in ids:
            if not 0 <= i < vocab_size:
                raise ValueError(f"token id {i} is out of range [0, {vocab_size})")
        return ids

    def special_ids(self) -> frozenset[int]:
        """Return the ids of the tokens registered as special, which `skip_special_tokens` drops."""
        return frozenset(i for i, token in self.backend.get_added_tokens_decoder().items() if token.special)

    def token_bytes(self) -> list[bytes]:
        """Return the bytes of every token, indexed by id. A special token's bytes are its UTF-8 text."""
        if self._token_bytes is None:
            if not isinstance(self.backend.decoder, decoders.ByteLevel):
                raise NotImplementedError(
                    "byte-level decoding requires a tokenizer with a ByteLevel decoder, got "
                    f"{type(self.backend.decoder).__name__}"
                )
            added = self.backend.get_added_tokens_decoder()
            table = []
            for token_id in range(self.vocab_size):
                token = self.backend.id_to_token(token_id)
                if token_id in added:
                    table.append(token.encode("utf-8"))
                    continue
                if any(c not in _BYTE_OF_CHAR for c in token):
                    raise ValueError(
                        f"token {token!r} (id {token_id}) has characters outside the byte-level alphabet"
                    )
                table.append(bytes(_BYTE_OF_CHAR[c] for c in token))
            self._token_bytes = table
        return self._token_bytes

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `directory`."""
        for name in (self.pad_token, self.bos_token, self.eos_token):
            self.token_id(name)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))

        special = {"pad_token": self.pad_token, "bos_token": self.bos_token, "eos_token": self.eos_token}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            # Set explicitly because older transformers 4.x releases default to True, which strips
            # spaces before punctuation when decoding, so its text would differ from `decode`.
            "clean_up_tokenization_spaces": False,
        }
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (directory / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


class StreamDecoder:
    """Turns generated ids into text one id at a time, never emitting half a character.

    A byte-level token can end in the middle of a multi-byte UTF-8 character, so its bytes are held until
    the character completes. Joining every `push` result and the final `flush` gives the text `decode` returns
    for the whole sequence.

    Other tokenizers (the SentencePiece-style byte fallback of the released Jamba checkpoints) have no bytes per
    token, so for them each `push` decodes all ids so far and returns the new text, holding back a trailing
    U+FFFD that later ids may complete. That costs one decode of the sequence per token.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._vocab_size = tokenizer.vocab_size
        try:
            self._token_bytes = tokenizer.token_bytes()
        except NotImplementedError:
            self._token_bytes = None
            self._ids: list[int] = []
            self._sent = 0  # characters of the decoded text already returned
        self._skipped = tokenizer.special_ids() if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id and return the text it completes, which may be empty."""
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} is out of range [0, {self._vocab_size})")
        if token_id in self._skipped:
            return ""
        if self._token_bytes is not None:
            return self._utf8.decode(self._token_bytes[token_id])
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special_tokens)
        end = len(text) - 1 if text.endswith("\ufffd") else len(text)
        new, self._sent = text[self._sent:end], max(self._sent, end)
        return new

    def flush(self) -> str:
        """End the stream and return what is still held, an incomplete character as U+FFFD."""
        if self._token_bytes is not None:
            return self._utf8.decode(b"", final=True)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special_tokens)
        rest, self._sent = text[self._sent:], len(text)
        return rest


def _read_documents(paths: Sequence[str]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line:
                    yield line


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jamba.tokenizer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a vocabulary from text files, one document per line")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    train.add_argument("--vocab-size", type=int, default=65536)
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--output", required=True, metavar="DIR", help="directory to write tokenizer.json into")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for path in args.input:
        if not os.path.isfile(path):
            parser.error(f"--input: no such file {path}")
    try:
        backend = train_tokenizer(
            _read_documents(args.input), vocab_size=args.vocab_size, min_frequency=args.min_frequency
        )
    except ValueError as e:
        parser.error(str(e))
    Tokenizer(backend).save(args.output)
    logger.info("wrote %s tokens to %s", backend.get_vocab_size(), args.output)


if __name__ == "__main__":
    main()
