import json
import random

import pytest
import tokenizers

from jamba.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    StreamDecoder,
    Tokenizer,
    main,
    train_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "There were 12345 apples and 678 pears in the 1990s.",
    "Numbers like 3.14159 and 2718 appear in the text, and so does 100000.",
    "Café au lait, naïve façade, Ærøskøbing.",
    "日本語のテキストも少し入っています。",
    "Emoji too: 🙂🚀, and math: ∑ x² ≥ 0.",
    "the theory of the thermal thing is there, then the other",
] * 20

TEXTS = [
    "hello world",
    "The answer is 42, not 4 or 2.",
    "café naïve façade",
    "日本語のテキスト",
    "mixed: 🙂 x² ∑ é 9",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_tokenizer(CORPUS, vocab_size=500))


def test_special_tokens_take_ids_0_1_2(tok):
    assert [tok.backend.id_to_token(i) for i in range(3)] == [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_training_learns_merges_within_vocab_size(tok):
    assert 259 < tok.vocab_size <= 500
    assert len(tok.encode("the")) == 1


def test_every_digit_is_one_token(tok):
    digit_ids = [tok.backend.token_to_id(str(d)) for d in range(10)]
    assert None not in digit_ids
    assert tok.encode("12345") == [digit_ids[d] for d in (1, 2, 3, 4, 5)]
    assert tok.encode("0123456789") == digit_ids

    ids = tok.encode("There were 12345 apples in 1990.")
    pieces = [tok.backend.id_to_token(i) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["1", "2", "3", "4", "5", "1", "9", "9", "0"]


def test_digits_never_merge_in_digit_corpus():
    backend = train_tokenizer(["123123123 a1a1 1990 x2x2 99 bottles"] * 200, vocab_size=400, min_frequency=1)
    merged = [t for t in backend.get_vocab() if len(t) > 1 and any(c.isdigit() for c in t)]
    assert merged == [t for t in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN) if any(c.isdigit() for c in t)]
    assert backend.get_vocab_size() > 259


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_add_bos_and_skip_special_tokens(tok):
    ids = tok.encode("hi", add_bos=True)
    assert ids[0] == 1
    assert ids[1:] == tok.encode("hi")
    assert tok.decode(ids + [tok.eos_id]) == "hi"
    assert tok.decode(ids + [tok.eos_id], skip_special_tokens=False) == f"{BOS_TOKEN}hi{EOS_TOKEN}"


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(ValueError, match=rf"token id 99999 is out of range \[0, {tok.vocab_size}\)"):
        tok.decode([5, 99999])


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_matches_decode(tok, text):
    ids = tok.encode(text, add_bos=True) + [tok.eos_id]
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_partial_characters(tok):
    ids = tok.encode("中")
    assert len(ids) == 3, "a 3-byte character absent from the corpus is three byte tokens"
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids] == ["", "", "中"]


def test_stream_decoder_keeps_special_tokens(tok):
    ids = [tok.bos_id, *tok.encode("ok"), tok.eos_id]
    stream = StreamDecoder(tok, skip_special_tokens=False)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == tok.decode(ids, skip_special_tokens=False) == f"{BOS_TOKEN}ok{EOS_TOKEN}"


def test_stream_decoder_on_random_ids(tok):
    # Random ids also produce invalid UTF-8, which both sides must replace the same way.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(3, tok.vocab_size) for _ in range(rng.randint(1, 12))]
        stream = StreamDecoder(tok)
        assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids), ids


def test_byte_tokens_cover_every_byte(tok):
    table = tok.token_bytes()
    assert table[:3] == [t.encode() for t in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)]
    assert sorted(table[3:259]) == [bytes([b]) for b in range(256)]


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["pad_token"], config["bos_token"], config["eos_token"]) == (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

    for path in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = Tokenizer.from_file(path)
        assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (0, 1, 2, tok.vocab_size)
        assert [loaded.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def test_from_file_keeps_custom_special_token_names(tmp_path):
    backend = train_tokenizer(CORPUS, vocab_size=300, special_tokens=("[PAD]", "[BOS]", "[EOS]"))
    Tokenizer(backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]").save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("[PAD]", "[BOS]", "[EOS]")
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)


def test_from_file_missing_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_file(tmp_path / "nope.json")


@pytest.mark.parametrize("loader", ["PreTrainedTokenizerFast", "AutoTokenizer"])
def test_transformers_loads_the_saved_directory(tok, tmp_path, loader):
    import transformers

    tok.save(tmp_path)
    hf = getattr(transformers, loader).from_pretrained(str(tmp_path))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert (hf.pad_token, hf.bos_token, hf.eos_token) == (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ids == tok.encode(text), text
        assert hf.decode(ids) == tok.decode(ids) == text


def test_missing_special_token_is_an_error(tok):
    renamed = Tokenizer(tok.backend, eos_token="<|eot|>")
    assert renamed.bos_id == 1
    with pytest.raises(ValueError, match=r"'<\|eot\|>' not found in the vocabulary"):
        renamed.eos_id


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 259}, r"vocab_size must be an integer greater than 259 .* got 259"),
        ({"vocab_size": 261, "special_tokens": ("a", "b", "c", "d", "e")}, r"vocab_size .* greater than 261"),
        ({"vocab_size": 300.0}, r"vocab_size .* got 300\.0"),
        ({"min_frequency": 0}, r"min_frequency must be an integer >= 1, got 0"),
        ({"special_tokens": ("<a>", "<a>")}, r"special_tokens must be distinct"),
        ({"special_tokens": ("<a>", "")}, r"special_tokens must be distinct non-empty"),
    ],
)
def test_train_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_tokenizer(CORPUS, **kwargs)


def test_train_rejects_a_single_string():
    with pytest.raises(TypeError, match="texts must be an iterable of documents"):
        train_tokenizer("one long document")


def byte_fallback_tokenizer() -> Tokenizer:
    """A tokenizer built like the released Jamba ones: SentencePiece pieces, bytes for anything else."""
    pieces = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", *[f"<0x{b:02X}>" for b in range(256)],
              "\u2581", "\u2581hello", "\u2581world", "h", "e", "l", "o", "w", "r", "d"]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE({p: i for i, p in enumerate(pieces)}, [],
                                                         byte_fallback=True))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Sequence([
        tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse(),
        tokenizers.decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(pieces[:3])
    return Tokenizer(backend)


def test_stream_decoder_on_byte_fallback_tokenizer():
    tok = byte_fallback_tokenizer()
    text = "hello world, h\u00e9llo w\u00f6rld"
    ids = tok.encode(text)
    stream = StreamDecoder(tok)

    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())

    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert any(tok.backend.id_to_token(i).startswith("<0x") for i in ids)


def test_cli_trains_and_saves(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    main(["train", "--input", str(corpus), "--vocab-size", "300", "--output", str(out)])
    loaded = Tokenizer.from_file(out)
    assert loaded.vocab_size == 300
    assert loaded.decode(loaded.encode("café 2024")) == "café 2024"


def test_cli_reports_bad_vocab_size(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["train", "--input", str(corpus), "--vocab-size", "10", "--output", str(tmp_path / "tok")])
    assert "vocab_size must be an integer greater than 259" in capsys.readouterr().err
