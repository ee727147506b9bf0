"""Token caches: round trips against direct encoding, every input kind, the file format, rank partitions,
deterministic sampling, merging, and the error for each kind of bad input or damaged cache."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from conftest import make_corpus

from aitextgen_batch.data import TokenDataset
from aitextgen_batch.data.build import build_cache
from aitextgen_batch.data.commands import PrepareConfig, is_token_cache, run_cache_info, run_prepare
from aitextgen_batch.errors import UserError


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from aitextgen_batch.models.loading import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def ids(tok, text: str) -> list[int]:
    """Direct encoding of one document or sample, with the eos the cache puts after it."""
    return tok(text)["input_ids"] + [tok.eos_token_id]


@pytest.fixture(scope="module")
def plain_cache(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("plain")
    a, b = folder / "a.txt", folder / "b.txt"
    a.write_text("\n".join(make_corpus(300, seed=1)) + "\n")
    b.write_text("\n".join(make_corpus(200, seed=2)))
    build_cache([a, b], tokenizer_dir, folder / "cache", num_shards=8)
    return folder


# -- round trips and input kinds -----------------------------------------------------------------------------------


def test_text_files_round_trip_as_documents_joined_by_eos(plain_cache, tok):
    ds = TokenDataset(plain_cache / "cache", tokenizer=tok)
    want = ids(tok, (plain_cache / "a.txt").read_text()) + ids(tok, (plain_cache / "b.txt").read_text())
    assert ds.tokens().tolist() == want
    assert ds.num_tokens == len(want) and ds.num_shards == 8
    assert max(ds.shard_tokens) - min(ds.shard_tokens) <= 1  # cut by token count
    assert ds.tokens([2, 3]).tolist() == want[sum(ds.shard_tokens[:2]) : sum(ds.shard_tokens[:4])]
    assert ds.index["dtype"] == "uint16" and ds.index["vocab_size"] == len(tok)
    assert (plain_cache / "cache" / "shard-00007.msgpack.gz").is_file()
    assert sorted(p.name for p in (plain_cache / "cache").iterdir() if p.name.startswith(".")) == []


def test_large_document_encoded_in_pieces_equals_whole(tmp_path, tokenizer_dir, tok):
    # Leading, trailing and repeated whitespace around the cut points, and a long run with no newline at all.
    text = "".join(f"  Line {i} of the quick fox.  \n\nThe dog, sleeps.\nBrown  bear\n" for i in range(60))
    text += " ".join(["jovial zebras"] * 300) + "\n"
    (tmp_path / "big.txt").write_text(text)
    ds = TokenDataset.build([tmp_path / "big.txt"], tokenizer_dir, tmp_path / "cache", num_shards=3, chunk_chars=97)
    assert ds.tokens().tolist() == ids(tok, text)


def test_line_by_line_keeps_the_first_line_and_ends_each_sample_with_eos(tmp_path, tokenizer_dir, tok):
    lines = ["First line is data, not a header.", "", "  second line with spaces  ", "   ", "third"]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    ds = TokenDataset.build(
        [tmp_path / "lines.txt"], tokenizer_dir, tmp_path / "cache", num_shards=2, line_by_line=True
    )
    kept = [line for line in lines if line.strip()]
    assert [s.tolist() for s in ds.samples()] == [ids(tok, line) for line in kept]
    assert ds.num_samples == 3 and [s["num_samples"] for s in ds.index["shards"]] == [1, 2]
    assert ds.shard_tokens[0] == len(ids(tok, kept[0]))  # shards are cut at a sample start
    assert ds.tokens().tolist() == sum((ids(tok, line) for line in kept), [])


def test_csv_parquet_jsonl_and_text_in_one_dataset(tmp_path, tokenizer_dir, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.csv").write_text('id,text\n1,"Hello, world."\n2,"Two\nlines"\n3,\n')
    pq.write_table(pa.table({"n": [1, 2, 3], "text": ["Parquet one.", None, "Parquet three."]}), tmp_path / "b.parquet")
    (tmp_path / "c.jsonl").write_text('{"text": "Json one."}\n\n{"text": "Json two.", "x": 1}\n')
    with gzip.open(tmp_path / "d.txt.gz", "wt") as f:
        f.write("Gzipped text file.\n")
    (tmp_path / "e.tsv").write_text("text\tn\nTab, separated.\t1\n")
    inputs = [tmp_path / n for n in ("a.csv", "b.parquet", "c.jsonl", "d.txt.gz", "e.tsv")]
    ds = TokenDataset.build(inputs, tokenizer_dir, tmp_path / "all", num_shards=2, column="text", field="text")
    docs = ["Hello, world.", "Two\nlines", "Parquet one.", "Parquet three.", "Json one.", "Json two."]
    docs += ["Gzipped text file.\n", "Tab, separated."]  # blank cells, nulls and blank lines are skipped
    assert ds.tokens().tolist() == sum((ids(tok, d) for d in docs), [])
    assert ds.index["source"]["inputs"] == [str(p) for p in inputs]

    rows = TokenDataset.build(
        inputs[:1], tokenizer_dir, tmp_path / "rows", num_shards=1, column="text", line_by_line=True
    )
    assert [s.tolist() for s in rows.samples()] == [ids(tok, d) for d in docs[:2]]  # a (multi-line) row is a sample
    with pytest.raises(UserError, match=r"column 'body' is not in '.*b.parquet'; its columns are: n, text$"):
        TokenDataset.build(inputs[1:2], tokenizer_dir, tmp_path / "x", column="body")


def test_from_texts_round_trip(tmp_path, tok):
    texts = ["One document.\nWith two lines.", "", "Another one."]
    ds = TokenDataset.from_texts(texts, tok, tmp_path / "cache")
    assert ds.tokens().tolist() == ids(tok, texts[0]) + ids(tok, texts[2])
    lines = TokenDataset.from_texts(texts, tok, tmp_path / "lines", line_by_line=True, num_shards=2)
    assert [s.tolist() for s in lines.samples()] == [ids(tok, texts[0]), ids(tok, texts[2])]


# -- the file format -----------------------------------------------------------------------------------------------


def test_shard_files_are_msgpack_maps_of_raw_little_endian_tokens(tmp_path, tok):
    texts = make_corpus(20)
    ds = TokenDataset.from_texts(texts, tok, tmp_path / "plain", num_shards=2, compress=False)
    index = json.loads((tmp_path / "plain" / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == ["shard-00000.msgpack", "shard-00001.msgpack"]
    raw = (tmp_path / "plain" / "shard-00001.msgpack").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == index["shards"][1]["sha256"] and len(raw) == index["shards"][1]["bytes"]
    shard = msgpack.unpackb(raw)
    assert set(shard) == {"format", "version", "shard", "dtype", "num_tokens", "tokens"}
    assert shard["num_tokens"] == index["shards"][1]["num_tokens"]
    assert np.frombuffer(shard["tokens"], "<u2").tolist() == ds.tokens().tolist()[index["shards"][0]["num_tokens"] :]

    lines = TokenDataset.from_texts(texts, tok, tmp_path / "lines", line_by_line=True)
    shard = msgpack.unpackb(gzip.decompress((tmp_path / "lines" / "shard-00000.msgpack.gz").read_bytes()))
    starts = np.frombuffer(shard["offsets"], "<u8").tolist()
    assert starts == np.cumsum([0] + [len(ids(tok, t)) for t in texts[:-1]]).tolist()
    assert shard["num_samples"] == lines.num_samples == 20
    assert set(json.loads((tmp_path / "lines" / "index.json").read_text())) >= {
        "format",
        "version",
        "tokenizer_fingerprint",
        "vocab_size",
        "dtype",
        "line_by_line",
        "total_tokens",
        "shards",
    }


def test_tokens_use_the_smallest_dtype_that_holds_the_vocabulary():
    from aitextgen_batch.data.cache import dtype_for_vocab

    assert [dtype_for_vocab(n) for n in (256, 257, 50257, 65536, 65537, 151_936)] == [
        "uint8",
        "uint16",
        "uint16",
        "uint16",
        "uint32",
        "uint32",
    ]


def test_same_input_gives_byte_identical_caches(tmp_path, tok):
    texts = make_corpus(50)
    a = TokenDataset.from_texts(texts, tok, tmp_path / "a", num_shards=3)
    b = TokenDataset.from_texts(texts, tok, tmp_path / "b", num_shards=3)
    assert [s["sha256"] for s in a.index["shards"]] == [s["sha256"] for s in b.index["shards"]]


# -- distributed training -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_rank_partition_covers_every_shard_once_with_balanced_tokens(plain_cache, world_size):
    ds = TokenDataset(plain_cache / "cache", verify=False)
    parts = [ds.shards_for_rank(r, world_size) for r in range(world_size)]
    assert sorted(i for p in parts for i in p) == list(range(ds.num_shards))
    assert all(parts)
    loads = [sum(ds.shard_tokens[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(ds.shard_tokens)
    if ds.num_shards % world_size == 0:
        assert max(loads) - min(loads) <= ds.num_shards // world_size  # shards differ by at most one token


def test_more_ranks_than_shards_is_an_error(plain_cache):
    ds = TokenDataset(plain_cache / "cache", verify=False)
    with pytest.raises(UserError, match=r"has 8 shards but there are 9 workers.*--num-shards 9"):
        ds.shards_for_rank(0, 9)
    with pytest.raises(UserError, match="rank must be in 0..3, got 4"):
        ds.shards_for_rank(4, 4)


def test_window_sampler_is_seeded_resumable_and_restricted_to_its_shards(plain_cache):
    ds = TokenDataset(plain_cache / "cache")
    shards = ds.shards_for_rank(1, 4)
    sampler = ds.sampler(block_size=32, seed=7, shards=shards)
    batch = sampler.batch(0, 64)
    assert batch["input_ids"].shape == (64, 32) and batch["input_ids"].dtype == np.int64
    assert (batch["labels"] == batch["input_ids"]).all() and (batch["attention_mask"] == 1).all()
    again = ds.sampler(block_size=32, seed=7, shards=shards)
    assert (again.batch(40, 24)["input_ids"] == batch["input_ids"][40:]).all()  # resume at item 40
    assert (again[5]["input_ids"] == batch["input_ids"][5]).all()
    assert not (ds.sampler(32, seed=8, shards=shards).batch(0, 64)["input_ids"] == batch["input_ids"]).all()
    stream = ds.tokens(shards)
    windows = {stream[i : i + 32].tobytes() for i in range(len(stream) - 31)}  # slices of the rank's own tokens
    assert all(row.astype(np.uint16).tobytes() in windows for row in batch["input_ids"])
    assert len(sampler) == len(stream) // 32
    with pytest.raises(UserError, match="fewer than block_size"):
        ds.sampler(block_size=len(stream) + 1, shards=shards)


def test_line_sampler_visits_every_sample_once_per_epoch_padded_and_masked(tmp_path, tok):
    texts = [f"Sample {i} " + "fox " * (i % 9) for i in range(30)]
    ds = TokenDataset.from_texts(texts, tok, tmp_path / "cache", line_by_line=True, num_shards=2)
    sampler = ds.sampler(block_size=8, seed=3)
    assert len(sampler) == 30
    epoch = sampler.batch(0, 30)
    firsts = sorted(tuple(row[:2]) for row in epoch["input_ids"])
    assert firsts == sorted(tuple(ids(tok, t)[:2]) for t in texts)
    for row, mask, labels in zip(epoch["input_ids"], epoch["attention_mask"], epoch["labels"]):
        n = int(mask.sum())
        match = [ids(tok, t)[:8] for t in texts if ids(tok, t)[:n] == row[:n].tolist()]
        assert match and len(match[0]) == n  # truncated to block_size, or the whole sample ending in eos
        assert (row[n:] == tok.pad_token_id).all() and (labels[n:] == -100).all() and (labels[:n] == row[:n]).all()
    assert (sampler.batch(30, 30)["input_ids"] != epoch["input_ids"]).any()  # a new order each epoch
    assert (ds.sampler(8, seed=3).batch(25, 10)["input_ids"][:5] == epoch["input_ids"][25:]).all()


# -- merge ---------------------------------------------------------------------------------------------------------


def test_merge_equalizes_at_random_and_concatenates_without_equalize(tmp_path, tok):
    small = TokenDataset.from_texts(make_corpus(10, seed=1), tok, tmp_path / "small", line_by_line=True)
    big_texts = make_corpus(40, seed=2)
    TokenDataset.from_texts(big_texts, tok, tmp_path / "big", line_by_line=True, num_shards=2)
    merged = TokenDataset.merge([small, tmp_path / "big"], tmp_path / "merged", seed=1)
    samples = [s.tolist() for s in merged.samples()]
    assert len(samples) == 20 and merged.num_shards == 2
    assert samples[:10] == [s.tolist() for s in small.samples()]
    big_ids = [ids(tok, t) for t in big_texts]
    picked = [big_ids.index(s) for s in samples[10:]]
    assert picked == sorted(picked) and len(set(picked)) == 10 and picked != list(range(10))

    plain = TokenDataset.merge(
        [
            TokenDataset.from_texts(["A b c."], tok, tmp_path / "p1"),
            TokenDataset.from_texts(["D e."], tok, tmp_path / "p2"),
        ],
        tmp_path / "plain",
        equalize=False,
    )
    assert plain.tokens().tolist() == ids(tok, "A b c.") + ids(tok, "D e.")
    with pytest.raises(UserError, match="only one of them is line_by_line"):
        TokenDataset.merge([small, plain], tmp_path / "bad")


def test_merge_plain_equalizes_by_blocks(tmp_path, tok):
    a = TokenDataset.from_texts(make_corpus(5, seed=3), tok, tmp_path / "a")
    b = TokenDataset.from_texts(make_corpus(50, seed=4), tok, tmp_path / "b")
    merged = TokenDataset.merge([a, b], tmp_path / "m", block_size=16, num_shards=1)
    blocks_a = -(-a.num_tokens // 16)
    assert merged.tokens()[: a.num_tokens].tolist() == a.tokens().tolist()
    assert a.num_tokens + (blocks_a - 1) * 16 < merged.num_tokens <= a.num_tokens + blocks_a * 16


# -- errors --------------------------------------------------------------------------------------------------------


def _copy_cache(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_shard_is_named(plain_cache, tmp_path, capsys):
    cache = _copy_cache(plain_cache / "cache", tmp_path / "cache")
    shard = cache / "shard-00003.msgpack.gz"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard shard-00003.msgpack.gz of token cache .* is corrupt: its sha256 "):
        TokenDataset(cache)
    lazy = TokenDataset(cache, verify=False)  # checked when loaded instead
    lazy.shard(2)
    with pytest.raises(UserError, match="rebuild the cache with `aitextgen-batch prepare`"):
        lazy.shard(3)
    assert run_cache_info(cache) == 1
    err = capsys.readouterr().err
    assert "shard shard-00003.msgpack.gz" in err and "is corrupt" in err and "1 of 8 shards failed" in err


def test_truncated_and_missing_shards_are_named(plain_cache, tmp_path, capsys):
    cache = _copy_cache(plain_cache / "cache", tmp_path / "cache")
    shard = cache / "shard-00001.msgpack.gz"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match=rf"shard-00001.msgpack.gz of token cache .* is truncated \({size - 10:,} of"):
        TokenDataset(cache, verify=False)
    (cache / "shard-00005.msgpack.gz").unlink()
    assert run_cache_info(cache) == 1
    err = capsys.readouterr().err
    assert "is truncated" in err and "shard shard-00005.msgpack.gz of token cache" in err and "is missing" in err
    assert "2 of 8 shards failed verification" in err


def test_tokenizer_mismatch_names_both_fingerprints(plain_cache, tmp_path, tok):
    from aitextgen_batch.tokenizer import train_tokenizer

    other = train_tokenizer(texts=make_corpus(100, seed=5), vocab_size=300, output=tmp_path / "other")
    from aitextgen_batch.models.fingerprint import tokenizer_fingerprint

    ds = TokenDataset(plain_cache / "cache", verify=False)
    with pytest.raises(UserError) as e:
        TokenDataset(plain_cache / "cache", tokenizer=tmp_path / "other")
    msg = str(e.value)
    assert f"built with tokenizer {ds.fingerprint}, but the model's tokenizer is {tokenizer_fingerprint(other)}" in msg
    assert "Rebuild the cache with the model's tokenizer" in msg
    TokenDataset(plain_cache / "cache", tokenizer=tok)


def test_input_errors(tmp_path, tokenizer_dir):
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(UserError, match=r"the inputs hold no text \(.*blank.txt\)"):
        build_cache([tmp_path / "blank.txt"], tokenizer_dir, tmp_path / "out", line_by_line=True)
    assert not (tmp_path / "out").exists()  # a failed build leaves nothing behind
    with pytest.raises(UserError, match="input '.*nope.txt' does not exist"):
        build_cache([tmp_path / "nope.txt"], tokenizer_dir, tmp_path / "out")
    (tmp_path / "a.csv").write_text("id,body\n1,hello\n")
    with pytest.raises(UserError) as e:
        build_cache([tmp_path / "a.csv"], tokenizer_dir, tmp_path / "out", column="text")
    assert str(e.value) == (
        f"column 'text' is not in {str(tmp_path / 'a.csv')!r}; its columns are: id, body "
        "(the first row of a CSV file is its header)"
    )
    with pytest.raises(UserError, match="has columns id, body; choose the text column with --column"):
        build_cache([tmp_path / "a.csv"], tokenizer_dir, tmp_path / "out")
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"a.jsonl:2: not valid JSON \(Expecting value\)"):
        build_cache([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out", field="text")
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(UserError, match=r"b.jsonl:2: no field 'text' \(keys: body\)"):
        build_cache([tmp_path / "b.jsonl"], tokenizer_dir, tmp_path / "out", field="text")
    with pytest.raises(UserError, match="is JSONL: pass --field"):
        build_cache([tmp_path / "b.jsonl"], tokenizer_dir, tmp_path / "out")
    (tmp_path / "one.txt").write_text("hi")
    with pytest.raises(UserError, match="too few for 8 shards"):
        build_cache([tmp_path / "one.txt"], tokenizer_dir, tmp_path / "out", num_shards=8)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="exists and is not empty"):
        build_cache([tmp_path / "one.txt"], tokenizer_dir, tmp_path / "full", num_shards=1)


def test_folder_without_index_is_not_a_cache(tmp_path):
    (tmp_path / "shard-00000.msgpack.gz").write_bytes(b"")
    assert not is_token_cache(tmp_path)
    with pytest.raises(UserError, match="is not a token cache: it has no index.json"):
        TokenDataset(tmp_path)


# -- commands ------------------------------------------------------------------------------------------------------


def test_prepare_flags_come_from_the_config(tmp_path):
    import argparse

    from aitextgen_batch.config import add_dataclass_arguments, config_from_namespace

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, PrepareConfig)
    argv = "--input a.csv b.jsonl --tokenizer tok --output out --num-shards 4 --line-by-line --no-compress"
    ns = parser.parse_args([*argv.split(), "--column", "text", "--field", "body"])
    cfg = config_from_namespace(PrepareConfig, ns)
    assert [str(p) for p in cfg.input] == ["a.csv", "b.jsonl"] and str(cfg.tokenizer) == "tok"
    assert (cfg.num_shards, cfg.line_by_line, cfg.compress, cfg.column, cfg.field) == (4, True, False, "text", "body")


def test_prepare_and_info_commands(corpus_file, tokenizer_dir, tmp_path, capsys):
    with pytest.raises(UserError, match=r"num_shards \(--num-shards\) must be >= 1, got 0"):
        PrepareConfig(input=[corpus_file], tokenizer=tokenizer_dir, output=tmp_path / "c", num_shards=0)
    with pytest.raises(UserError, match=r"tokenizer \(--tokenizer\) is required"):
        PrepareConfig(input=[corpus_file], output=tmp_path / "c")
    cfg = PrepareConfig(
        input=[corpus_file], tokenizer=tokenizer_dir, output=tmp_path / "c", num_shards=4, compress=False
    )
    assert run_prepare(cfg) == 0
    out = capsys.readouterr().out
    ds = TokenDataset(tmp_path / "c")
    assert f"wrote token cache {tmp_path / 'c'}: {ds.num_tokens:,} tokens (uint16) in 4 shards" in out
    assert is_token_cache(tmp_path / "c") and (tmp_path / "c" / "shard-00003.msgpack").is_file()
    assert run_cache_info(tmp_path / "c") == 0
    out = capsys.readouterr().out
    assert f"{ds.num_tokens:,}" in out and "all 4 shards verified (sha256)" in out


def test_importing_the_package_loads_no_torch_or_transformers():
    code = "import sys, aitextgen_batch.data; print('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_a_byte_order_mark_is_dropped_and_invalid_text_is_named(tmp_path, tokenizer_dir, tok):
    bom = b"\xef\xbb\xbf"
    lines = ["The quick brown fox.", "A lazy dog."]
    # each input with and without a BOM: the caches hold the same tokens (the BOM is neither a token nor a header)
    plain = {
        "t.txt": "\n".join(lines) + "\n",
        "c.csv": "text,n\n" + "".join(f"{line},1\n" for line in lines),
        "j.jsonl": "".join(json.dumps({"text": line}) + "\n" for line in lines),
    }
    for name, text in plain.items():
        (tmp_path / name).write_text(text)
        (tmp_path / f"bom-{name}").write_bytes(bom + text.encode())
    for name in plain:
        got = []
        for prefix in ("", "bom-"):
            out = tmp_path / f"cache-{prefix}{name}"
            build_cache([tmp_path / f"{prefix}{name}"], tokenizer_dir, out, num_shards=1, column="text", field="text")
            got.append(TokenDataset(out).tokens().tolist())
        assert got[0] == got[1], name
    assert tok.decode(got[0][:3]).startswith("The")
    # a lone surrogate (a JSON escape no UTF-8 file can hold) and bytes that are not UTF-8: named with their line
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n{"text": "Broken emoji \\ud83d here"}\n')
    with pytest.raises(UserError, match=r"s.jsonl:2: field 'text' is not valid Unicode \(a lone surrogate '\\ud83d'"):
        build_cache([tmp_path / "s.jsonl"], tokenizer_dir, tmp_path / "c-s", num_shards=1, field="text")
    (tmp_path / "b.txt").write_bytes(b"fine\nstill fine\nnot \xff fine\n")
    with pytest.raises(UserError, match=r"input '.*b.txt' line 3 is not UTF-8 text \(invalid start byte\)"):
        build_cache([tmp_path / "b.txt"], tokenizer_dir, tmp_path / "c-b", num_shards=1)
    assert not (tmp_path / "c-s").exists() and not (tmp_path / "c-b").exists()


def test_train_tokenizer_drops_a_byte_order_mark(tmp_path, corpus_file):
    from aitextgen_batch.tokenizer import train_tokenizer

    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + corpus_file.read_bytes())
    # a vocabulary large enough to learn every pair the corpus holds: a BOM kept as text would become a token
    a = train_tokenizer([corpus_file], vocab_size=2000, output=tmp_path / "a", min_frequency=1)
    b = train_tokenizer([tmp_path / "bom.txt"], vocab_size=2000, output=tmp_path / "b", min_frequency=1)
    assert a.get_vocab() == b.get_vocab() and not any("\u00ef\u00bb\u00bf" in t for t in b.get_vocab())
