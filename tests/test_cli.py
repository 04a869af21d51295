"""`guard moderate` as users script it: the installed console script (the first call; the rest
through the same ``main`` in this process), real files, stable JSON."""

from __future__ import annotations

import json

import pytest
from cli_runner import guard_main, guard_script

from guard.demo.corpus import SHOWCASE
from guard.text.conversation import Message


@pytest.fixture(scope="module")
def unsafe_json(demo_dir):
    ex = SHOWCASE[2]
    result = guard_script("moderate", "--model", str(demo_dir), "--prompt", ex.prompt, "--text", ex.response, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_json_output_has_the_documented_fields(unsafe_json, demo_runtime):
    cfg = demo_runtime.guard.config
    assert set(unsafe_json["prompt"]) >= {"risk", "probs", "category", "category_probs"}
    assert set(unsafe_json["prompt"]["probs"]) == set(cfg.query_risk.labels.names)
    token = unsafe_json["tokens"][0]
    assert set(token) >= {"id", "text", "risk", "probs", "category", "category_probs"}
    assert set(token["category_probs"]) == set(cfg.response_categories.names)
    assert unsafe_json["model"]["demo"] is True and "not a safety model" in unsafe_json["model"]["notice"]


def test_json_tokens_reassemble_the_response_and_report_the_interrupt(unsafe_json):
    ex = SHOWCASE[2]
    assert "".join(t["text"] for t in unsafe_json["tokens"]) == ex.response + "<|im_end|>"
    index = unsafe_json["interrupt_index"]
    assert index is not None
    assert unsafe_json["tokens"][index]["risk"] == "Unsafe"
    assert unsafe_json["tokens"][index]["category"] == "Violent"
    assert unsafe_json["tokens"][0]["category"] is None  # safe tokens carry no category


def test_ids_file_input(tmp_path, demo_dir, guard_tokenizer):
    prompt = guard_tokenizer.render_prompt([Message("user", "Hello")]).prompt_ids
    response = guard_tokenizer.encode("Sure, I am happy to help with that.")
    path = tmp_path / "ids.json"
    path.write_text(json.dumps({"prompt": list(prompt), "response": response}))
    result = guard_main("moderate", "--model", str(demo_dir), "--ids", str(path), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [t["id"] for t in out["tokens"]] == response
    assert out["interrupt_index"] is None


def test_messages_file_ending_with_a_user_turn_judges_only_the_prompt(tmp_path, demo_dir):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"role": "user", "content": SHOWCASE[4].prompt}]))
    result = guard_main("moderate", "--model", str(demo_dir), "--messages", str(path), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["prompt"]["risk"] == "Unsafe" and out["prompt"]["category"] == "Violent"
    assert out["tokens"] == [] and out["interrupt_index"] is None


def test_table_output_marks_the_interrupt_and_the_demo(demo_dir):
    ex = SHOWCASE[3]
    result = guard_main("moderate", "--model", str(demo_dir), "--prompt", ex.prompt, "--text", ex.response)
    assert result.returncode == 0, result.stderr
    assert "DEMO MODEL" in result.stdout
    assert "<- interrupt" in result.stdout and "response: interrupted at token" in result.stdout


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"prompt": [1, 2]}', "must end with the <|im_end|> token"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": [151645], "response": [999999999]}', "outside the vocabulary"),
        ('{"prompt": [151645], "response": ["12"]}', "must be an integer"),
        ('{"prompt": [151645], "response": 7}', "`response` must be a list"),
    ],
)
def test_bad_ids_file_is_a_clear_error(tmp_path, demo_dir, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = guard_main("moderate", "--model", str(demo_dir), "--ids", str(path))
    assert result.returncode == 2
    assert match in result.stderr and "Traceback" not in result.stderr


def test_missing_model_directory_is_a_clear_error(tmp_path):
    result = guard_main("moderate", "--model", str(tmp_path / "nope"), "--text", "hi")
    assert result.returncode == 2 and "neither 'demo' nor a checkpoint directory" in result.stderr
