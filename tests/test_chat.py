"""Chat messages rendered with a chat template: validation, system prompts, and refusal without a template."""

from __future__ import annotations

import pytest

from aitextgen_batch.errors import UserError
from aitextgen_batch.generation.chat import ChatRenderer

# A small chat template of our own (the tiny test tokenizer has none).
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from aitextgen_batch.models.loading import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE)
    return path


def test_renders_as_apply_chat_template(tok, template_file):
    messages = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "jumps"}]
    text, err = ChatRenderer(tok, template_file).render(messages)
    want = tok.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert err is None and text == want == "<|user|>the fox\n<|assistant|>jumps\n<|assistant|>"


def test_system_prompt_goes_first_unless_the_row_has_one(tok, template_file):
    r = ChatRenderer(tok, template_file, system_prompt="Be brief.")
    assert r.render([{"role": "user", "content": "hi"}])[0] == "<|system|>Be brief.\n<|user|>hi\n<|assistant|>"
    own = [{"role": "system", "content": "Be long."}, {"role": "user", "content": "hi"}]
    assert r.render(own)[0] == "<|system|>Be long.\n<|user|>hi\n<|assistant|>"
    assert r.render_user("hi")[0] == "<|system|>Be brief.\n<|user|>hi\n<|assistant|>"


@pytest.mark.parametrize(
    "messages, error",
    [
        ("hello", "messages must be a list of {role, content} objects, got str"),
        ([], "messages is an empty list"),
        (["hi"], "message 0 must be a {role, content} object, got str"),
        ([{"role": "wizard", "content": "hi"}], "message 0 has role 'wizard'; use one of system, user"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], "message 1 (user) content must be"),
        ([{"role": "user"}], "message 0 (user) content must be a string, got NoneType"),
    ],
)
def test_malformed_messages_name_what_is_wrong(tok, template_file, messages, error):
    text, err = ChatRenderer(tok, template_file).render(messages)
    assert text is None and error in err


def test_template_refusal_is_a_row_error(tok, tmp_path):
    path = tmp_path / "strict.jinja"
    path.write_text(
        "{% if messages[-1]['role'] != 'user' %}{{ raise_exception('the last message must be the user') }}{% endif %}"
        + TEMPLATE
    )
    text, err = ChatRenderer(tok, path).render([{"role": "assistant", "content": "x"}])
    assert text is None and "the last message must be the user" in err


def test_missing_or_broken_template_is_refused(tok, tmp_path):
    assert not tok.chat_template
    with pytest.raises(UserError, match="has no chat template.*--chat-template FILE"):
        ChatRenderer(tok)
    with pytest.raises(UserError, match="is not a file"):
        ChatRenderer(tok, tmp_path / "nope.jinja")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(UserError, match="is not a valid Jinja template"):
        ChatRenderer(tok, bad)


def test_template_hash_identifies_the_template(tok, template_file, tmp_path):
    other = tmp_path / "other.jinja"
    other.write_text(TEMPLATE + " ")
    assert ChatRenderer(tok, template_file).template_sha256 != ChatRenderer(tok, other).template_sha256


def test_template_files_that_are_not_utf8_empty_or_start_with_a_bom(tok, tmp_path):
    bad = tmp_path / "latin1.jinja"
    bad.write_bytes(TEMPLATE.replace("<|", "\xab|").encode("latin-1"))
    with pytest.raises(UserError, match=r"--chat-template '.*latin1.jinja' is not UTF-8 text \(invalid start byte at"):
        ChatRenderer(tok, bad)
    empty = tmp_path / "empty.jinja"
    empty.write_text(" \n")
    with pytest.raises(UserError, match=r"--chat-template '.*empty.jinja' is empty; give a Jinja chat template"):
        ChatRenderer(tok, empty)
    bom = tmp_path / "bom.jinja"
    bom.write_bytes(b"\xef\xbb\xbf" + TEMPLATE.encode())
    r = ChatRenderer(tok, bom)
    assert r.template == TEMPLATE and r.render([{"role": "user", "content": "hi"}])[0] == "<|user|>hi\n<|assistant|>"


def test_a_row_the_template_fails_on_is_that_rows_error(tok, tmp_path):
    path = tmp_path / "fragile.jinja"
    path.write_text("{% if messages[-1]['content'] == 'boom' %}{{ 1 // 0 }}{% endif %}" + TEMPLATE)
    r = ChatRenderer(tok, path)
    assert r.render([{"role": "user", "content": "fine"}]) == ("<|user|>fine\n<|assistant|>", None)
    text, err = r.render([{"role": "user", "content": "boom"}])
    assert text is None and err.startswith("the chat template failed on this row's messages (ZeroDivisionError")
    text, err = r.render([{"role": "user", "content": "Broken emoji \ud83d here"}])
    assert err == "message 0 (user) content is not valid Unicode (a lone surrogate '\\ud83d' at character 13)"


def test_a_template_that_refuses_the_system_prompt_is_refused_before_ray(tiny_model_dir, tmp_path):
    import time

    from aitextgen_batch.batch.api import generate_dataset

    path = tmp_path / "no-system.jinja"
    path.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    )
    (tmp_path / "p.jsonl").write_text('{"prompt": "the fox"}\n')
    job = dict(input=str(tmp_path / "p.jsonl"), model=str(tiny_model_dir), chat=True, chat_template=str(path))
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"refused every row's messages: no system messages .*with --system-prompt"):
        generate_dataset(output=str(tmp_path / "out"), system_prompt="Be brief.", **job)  # Ray is never started
    assert time.monotonic() - t0 < 20 and not (tmp_path / "out").exists()
    s = generate_dataset(output=str(tmp_path / "ok"), in_process=True, max_new_tokens=4, quiet=True, **job)
    assert s.status == "complete"
