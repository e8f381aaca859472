"""Loading and validation: schemas, stable idx, and errors that name file, line and remedy."""

from __future__ import annotations

import json

import pytest

from megatron_wmss.data import DataConfig, DataFormatError, row_to_messages, tokenize_sft
from megatron_wmss.data.sources import load_sources
from tests.unit.data_fixtures import (  # noqa: F401  (fixtures)
    COMPLETIONS,
    PROMPTS,
    SYSTEM,
    cache_dir,
    rows_for,
    sp_tokenizer,
    write_rows,
)

ALL_SCHEMAS = "chat: messages.*prompt_completion: prompt \\+ completion.*question_answer.*" \
              "instruction_output: instruction \\+ output"


@pytest.mark.parametrize("schema", ["chat", "prompt_completion", "question_answer",
                                    "instruction_output"])
def test_every_schema_becomes_one_exchange(tmp_path, cache_dir, schema):
    path = write_rows(tmp_path / "d.jsonl", rows_for(schema))
    (source,) = load_sources([path], "auto", cache_dir=cache_dir)
    assert source.schema == schema
    messages = row_to_messages(schema, source.table[0], "row 0")
    assert messages[-2:] == [{"role": "user", "content": PROMPTS[0]},
                             {"role": "assistant", "content": COMPLETIONS[0]}]
    if schema == "chat":
        assert messages[0] == {"role": "system", "content": SYSTEM}


def test_optional_system_and_alpaca_input_fold_into_the_prompt():
    row = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello",
           "system": "Be terse."}
    assert row_to_messages("instruction_output", row, "row 0") == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Translate.\n\nBonjour"},
        {"role": "assistant", "content": "Hello"}]


def test_idx_field_is_kept_else_global_row_numbers(tmp_path, cache_dir, sp_tokenizer):
    with_idx = write_rows(tmp_path / "a.jsonl", rows_for("chat", 3, with_idx=True))
    plain_1 = write_rows(tmp_path / "b.parquet", rows_for("question_answer", 2))
    plain_2 = write_rows(tmp_path / "c.json", rows_for("prompt_completion", 2))
    config = DataConfig(paths=[with_idx, plain_1, plain_2], cache_dir=cache_dir)
    data = tokenize_sft(config, sp_tokenizer)
    # Row numbers count over all files in order: b.parquet holds rows 3-4, c.json rows 5-6.
    assert data.idx.tolist() == [100, 101, 102, 3, 4, 5, 6]
    assert data.dataset["idx"] == data.idx.tolist()


def test_directory_expands_to_sorted_data_files(tmp_path, cache_dir):
    write_rows(tmp_path / "dir" / "b.jsonl", rows_for("chat", 1))
    write_rows(tmp_path / "dir" / "a.parquet", rows_for("question_answer", 2))
    (tmp_path / "dir" / "notes.txt").write_text("not data")
    sources = load_sources([str(tmp_path / "dir")], "auto", cache_dir=cache_dir)
    assert [(s.name.rsplit("/", 1)[-1], s.schema, s.first_row) for s in sources] == [
        ("a.parquet", "question_answer", 0), ("b.jsonl", "chat", 2)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_malformed_json_names_file_and_line(tmp_path, cache_dir, suffix):
    good = [json.dumps(r) for r in rows_for("prompt_completion", 3)]
    if suffix == ".jsonl":
        text = "\n".join([good[0], good[1], '{"prompt": "p", "completion": "c"', good[2]])
        line = 3
    else:
        text = "[\n" + ",\n".join([good[0], good[1] + "}", good[2]]) + "\n]"
        line = 3
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=rf"bad\{suffix}:{line}: malformed JSON"):
        load_sources([str(path)], "auto", cache_dir=cache_dir)


def test_missing_fields_name_the_accepted_schemas(tmp_path, cache_dir):
    path = write_rows(tmp_path / "d.jsonl", [{"text": "no schema here"}])
    with pytest.raises(DataFormatError,
                       match=rf"\['text'\] match no accepted schema.*{ALL_SCHEMAS}"):
        load_sources([path], "auto", cache_dir=cache_dir)
    path = write_rows(tmp_path / "e.jsonl", rows_for("question_answer", 1))
    with pytest.raises(DataFormatError, match=r"schema 'chat' needs field\(s\) \['messages'\]"):
        load_sources([path], "chat", cache_dir=cache_dir)


def test_missing_field_in_one_row_names_row_and_schemas(tmp_path, cache_dir, sp_tokenizer):
    rows = rows_for("prompt_completion", 3)
    del rows[2]["completion"]
    path = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataFormatError,
                       match=rf"d.jsonl row 2 \(idx 2\): field 'completion' is missing"
                             rf".*{ALL_SCHEMAS}"):
        tokenize_sft(DataConfig(paths=[path], cache_dir=cache_dir), sp_tokenizer)


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "user", "content": "q"}], "must end with an 'assistant' message"),
    ([{"role": "user"}, {"role": "assistant", "content": "a"}], r"messages\[0\].*'content'"),
    ([], "non-empty list"),
])
def test_bad_chat_rows_are_errors(messages, expected):
    with pytest.raises(DataFormatError, match=expected):
        row_to_messages("chat", {"messages": messages}, "f.jsonl row 7")


def test_duplicate_idx_is_an_error_naming_both_rows(tmp_path, cache_dir, sp_tokenizer):
    a = write_rows(tmp_path / "a.jsonl", rows_for("chat", 2, with_idx=True))
    b = write_rows(tmp_path / "b.jsonl", rows_for("chat", 1, with_idx=True))  # idx 100 again
    with pytest.raises(DataFormatError, match=r"duplicate sample idx.*idx 100 at .*a.jsonl row 0, "
                                              r".*b.jsonl row 0"):
        tokenize_sft(DataConfig(paths=[a, b], cache_dir=cache_dir), sp_tokenizer)


def test_non_integer_or_partial_idx_is_an_error(tmp_path, cache_dir):
    rows = rows_for("chat", 2)
    rows[0]["idx"] = 5
    path = write_rows(tmp_path / "partial.jsonl", rows)
    with pytest.raises(DataFormatError, match="'idx' is missing in 1 row"):
        load_sources([path], "auto", cache_dir=cache_dir)
    rows[1]["idx"] = "six"
    rows[0]["idx"] = "five"
    path = write_rows(tmp_path / "strings.jsonl", rows)
    with pytest.raises(DataFormatError, match="'idx' has type .*string.*expected integers"):
        load_sources([path], "auto", cache_dir=cache_dir)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sources([str(tmp_path / "nope.jsonl")], "auto")


def test_gzipped_jsonl_and_a_json_object_file(tmp_path, cache_dir):
    import gzip

    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows_for("chat", 2)))
    (source,) = load_sources([str(path)], "auto", cache_dir=cache_dir)
    assert (source.schema, len(source.table)) == ("chat", 2)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"data": rows_for("chat", 2)}, indent=1))
    with pytest.raises(DataFormatError, match=r"obj.json: columns \['data'\] match no accepted"):
        load_sources([str(obj)], "auto", cache_dir=cache_dir)
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataFormatError, match=r"unknown data file suffix; accepted: .jsonl, "):
        load_sources([str(tmp_path / "notes.csv")], "auto")
