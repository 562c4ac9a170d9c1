"""Trait definition files: the shipped traits, the schema's checks, drafting with an LLM
against a real local HTTP chat endpoint, and the `personavec trait` commands (fast, no vLLM)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from personavec_vllm.cli import main
from personavec_vllm.traits import (
    TRAITS_DIR,
    TraitDefinition,
    TraitDraftError,
    TraitFileError,
    draft_trait,
    load_trait,
    parse_trait,
    shipped_traits,
    validate_file,
)
from personavec_vllm.traits.schema import (
    DEFAULT_COHERENCE_PROMPT,
    MIN_INSTRUCTION_PAIRS,
    MIN_MULTIPLE_CHOICE,
    MIN_QUESTIONS,
)

SHIPPED = ["evil", "sycophantic", "hallucinating", "impolite", "humorous"]


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


@pytest.fixture
def valid_data() -> dict:
    """A valid trait definition as raw JSON data (a copy of a shipped one)."""
    return json.loads((TRAITS_DIR / "evil.json").read_text())


# ---------------------------------------------------------------------------------------
# shipped traits


def test_shipped_traits_are_listed():
    assert set(SHIPPED) <= set(shipped_traits())
    assert Path(TRAITS_DIR).resolve() == (
        Path(__file__).resolve().parent.parent / "personavec_vllm" / "data" / "traits"
    )


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_trait_is_valid_and_complete(name):
    path = TRAITS_DIR / f"{name}.json"
    trait = validate_file(path)
    assert trait == load_trait(name) == load_trait(str(path))
    assert trait.name == name
    assert len(trait.description) > 80
    assert len(trait.instruction_pairs) >= MIN_INSTRUCTION_PAIRS
    assert len(trait.extraction_questions) >= MIN_QUESTIONS
    assert len(trait.evaluation_questions) >= MIN_QUESTIONS
    assert len(trait.multiple_choice) >= MIN_MULTIPLE_CHOICE
    # disjoint, and no duplicates inside each set (ignoring case and spacing)
    extraction = {_norm(q) for q in trait.extraction_questions}
    evaluation = {_norm(q) for q in trait.evaluation_questions}
    assert len(extraction) == len(trait.extraction_questions)
    assert len(evaluation) == len(trait.evaluation_questions)
    assert not extraction & evaluation
    # strong, explicit positive prompts; distinct pairs
    assert len({(_norm(p.positive), _norm(p.negative)) for p in trait.instruction_pairs}) == len(
        trait.instruction_pairs
    )
    assert any(name in p.positive.lower() for p in trait.instruction_pairs)
    # multiple choice: two distinct answers of similar length
    for item in trait.multiple_choice:
        a, b = len(item.trait_answer), len(item.other_answer)
        assert _norm(item.trait_answer) != _norm(item.other_answer)
        assert max(a, b) / min(a, b) < 1.5, item
    # the judge prompt is a 0-100 number-only prompt that fills in the answer
    filled = trait.format_judge_prompt("QUESTION {x}", "ANSWER }{")
    assert "QUESTION {x}" in filled and "ANSWER }{" in filled
    assert "0 to 100" in trait.judge_prompt and "just the number" in trait.judge_prompt
    assert trait.coherence_prompt == DEFAULT_COHERENCE_PROMPT
    assert "ANSWER" in trait.format_coherence_prompt("Q", "ANSWER")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_is_in_canonical_form(name):
    """Files are what TraitDefinition.save writes (so a round trip changes nothing)."""
    path = TRAITS_DIR / f"{name}.json"
    assert load_trait(name).to_json() == path.read_text(encoding="utf-8")


def test_traits_do_not_share_questions():
    seen: dict[str, str] = {}
    for name in SHIPPED:
        trait = load_trait(name)
        for q in trait.extraction_questions + trait.evaluation_questions:
            assert seen.setdefault(_norm(q), name) == name, f"{q!r} in {seen[_norm(q)]} and {name}"


def test_unknown_trait_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="unknown trait 'no_such_trait'.*evil"):
        load_trait("no_such_trait")
    with pytest.raises(FileNotFoundError, match="no such trait definition file"):
        load_trait("/nonexistent/dir/x.json")


# ---------------------------------------------------------------------------------------
# the schema rejects bad files, naming the field


def _drop(key):
    def f(d):
        del d[key]

    return f


def _set(key, value):
    def f(d):
        d[key] = value

    return f


BAD_FILES = [
    # (id, mutation, expected JSON path, expected words in the message)
    ("missing-judge", _drop("judge_prompt"), "judge_prompt", "Field required"),
    ("missing-name", _drop("name"), "name", "Field required"),
    ("bad-name", _set("name", "Evil Trait!"), "name", "not a valid trait name"),
    ("blank-description", _set("description", "   "), "description", "must not be empty"),
    ("wrong-version", _set("schema_version", 2), "schema_version", "1"),
    ("unknown-field", _set("judge_promt", "x"), "judge_promt", "unknown field"),
    ("judge-no-answer", _set("judge_prompt", "Rate {question}. Number only."), "judge_prompt", "{answer}"),
    ("judge-no-question", _set("judge_prompt", "Rate {answer}."), "judge_prompt", "{question}"),
    ("judge-extra-placeholder", _set("judge_prompt", "{trait}: {question} {answer}"), "judge_prompt", "{trait}"),
    ("judge-lone-brace", _set("judge_prompt", "{question} {answer} {"), "judge_prompt", "not a valid template"),
    ("judge-not-string", _set("judge_prompt", 42), "judge_prompt", "string"),
    ("coherence-no-question", _set("coherence_prompt", "Is {answer} coherent?"), "coherence_prompt", "{question}"),
    (
        "few-pairs",
        (lambda d: d.update(instruction_pairs=d["instruction_pairs"][:4])),
        "instruction_pairs",
        "at least 5",
    ),
    (
        "pair-blank-positive",
        (lambda d: d["instruction_pairs"][0].update(positive="")),
        "instruction_pairs[0].positive",
        "must not be empty",
    ),
    (
        "pair-same-prompts",
        (lambda d: d["instruction_pairs"][1].update(negative=d["instruction_pairs"][1]["positive"].upper())),
        "instruction_pairs[1].negative",
        "must differ from positive",
    ),
    (
        "pair-typo",
        (lambda d: d["instruction_pairs"][2].update(postive="x")),
        "instruction_pairs[2].postive",
        "unknown field",
    ),
    (
        "pair-missing-negative",
        (lambda d: d["instruction_pairs"][3].pop("negative")),
        "instruction_pairs[3].negative",
        "Field required",
    ),
    (
        "pair-duplicate",
        (lambda d: d["instruction_pairs"].__setitem__(4, dict(d["instruction_pairs"][0]))),
        "instruction_pairs[4]",
        "duplicate of instruction_pairs[0]",
    ),
    ("pairs-not-list", _set("instruction_pairs", "You are evil."), "instruction_pairs", "list"),
    (
        "few-extraction",
        (lambda d: d.update(extraction_questions=d["extraction_questions"][:19])),
        "extraction_questions",
        "at least 20",
    ),
    (
        "few-evaluation",
        (lambda d: d.update(evaluation_questions=d["evaluation_questions"][:3])),
        "evaluation_questions",
        "at least 20",
    ),
    (
        "extraction-not-string",
        (lambda d: d["extraction_questions"].__setitem__(0, 7)),
        "extraction_questions[0]",
        "string",
    ),
    (
        "extraction-duplicate",
        (lambda d: d["extraction_questions"].__setitem__(5, " " + d["extraction_questions"][1].lower())),
        "extraction_questions[5]",
        "duplicate of extraction_questions[1]",
    ),
    (
        "evaluation-in-extraction",
        (lambda d: d["evaluation_questions"].__setitem__(3, d["extraction_questions"][7])),
        "evaluation_questions[3]",
        "also extraction_questions[7]",
    ),
    (
        "evaluation-duplicate",
        (lambda d: d["evaluation_questions"].__setitem__(6, d["evaluation_questions"][2])),
        "evaluation_questions[6]",
        "duplicate of evaluation_questions[2]",
    ),
    ("few-mc", (lambda d: d.update(multiple_choice=d["multiple_choice"][:10])), "multiple_choice", "at least 20"),
    (
        "mc-same-answers",
        (lambda d: d["multiple_choice"][2].update(other_answer=d["multiple_choice"][2]["trait_answer"])),
        "multiple_choice[2].other_answer",
        "must differ from trait_answer",
    ),
    (
        "mc-missing-answer",
        (lambda d: d["multiple_choice"][0].pop("other_answer")),
        "multiple_choice[0].other_answer",
        "Field required",
    ),
    (
        "mc-blank-question",
        (lambda d: d["multiple_choice"][4].update(question=" ")),
        "multiple_choice[4].question",
        "must not be empty",
    ),
    (
        "mc-duplicate-question",
        (lambda d: d["multiple_choice"][9].update(question=d["multiple_choice"][8]["question"])),
        "multiple_choice[9].question",
        "duplicate of multiple_choice[8].question",
    ),
    (
        "mc-not-object",
        (lambda d: d["multiple_choice"].__setitem__(1, "yes or no?")),
        "multiple_choice[1]",
        "MultipleChoiceItem",
    ),
]


@pytest.mark.parametrize("mutate, path, words", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_schema_rejects_bad_file_naming_the_field(valid_data, tmp_path, mutate, path, words):
    mutate(valid_data)
    with pytest.raises(TraitFileError) as info:
        parse_trait(valid_data, "bad.json")
    problems = {str(p.path): p.message for p in info.value.problems}
    assert path in problems, info.value
    assert words.lower() in problems[path].lower(), info.value
    assert len(info.value.problems) == 1, info.value  # only the one problem we made
    assert f"{path}: " in str(info.value) and str(info.value).startswith("bad.json: ")
    # the same through a file on disk
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(valid_data))
    with pytest.raises(TraitFileError, match=path.replace("[", r"\[").replace("]", r"\]")):
        validate_file(f)
    # and the pydantic model itself rejects it
    with pytest.raises(ValueError):
        TraitDefinition.model_validate(valid_data)


def test_every_problem_is_listed_at_once(valid_data):
    valid_data["name"] = "Bad Name"
    valid_data["instruction_pairs"] = valid_data["instruction_pairs"][:2]
    valid_data["instruction_pairs"][0]["negative"] = valid_data["instruction_pairs"][0]["positive"]
    valid_data["evaluation_questions"][0] = valid_data["extraction_questions"][0]
    valid_data["judge_prompt"] = "no placeholders"
    valid_data["multiple_choice"][0]["trait_answer"] = ""
    with pytest.raises(TraitFileError) as info:
        parse_trait(valid_data, "x.json")
    paths = [p.path for p in info.value.problems]
    assert paths == [
        "name",
        "instruction_pairs",
        "instruction_pairs[0].negative",
        "evaluation_questions[0]",
        "judge_prompt",
        "multiple_choice[0].trait_answer",
    ]
    assert "6 problems" in str(info.value)


def test_not_json_and_not_an_object(tmp_path):
    f = tmp_path / "t.json"
    f.write_text('{"name": "x",\n  oops}')
    with pytest.raises(TraitFileError, match=r"invalid JSON at line 2 column 3"):
        validate_file(f)
    f.write_text("[1, 2]")
    with pytest.raises(TraitFileError, match=r"\(top level\): a trait definition must be a JSON object"):
        validate_file(f)
    with pytest.raises(FileNotFoundError):
        validate_file(tmp_path / "missing.json")


def test_save_round_trip_and_optional_coherence_prompt(valid_data, tmp_path):
    trait = parse_trait(valid_data)
    out = trait.save(tmp_path / "sub" / "evil.json")
    assert load_trait(out) == trait
    assert "coherence_prompt" not in json.loads(out.read_text())  # the default is left out
    custom = trait.model_copy(update={"coherence_prompt": "Coherent? {question} -> {answer}. Number only."})
    custom.save(out)
    again = load_trait(out)
    assert again.coherence_prompt.startswith("Coherent?")
    assert again.format_coherence_prompt("a", "b") == "Coherent? a -> b. Number only."
    assert [p.name for p in out.parent.iterdir()] == ["evil.json"]  # no temp files left


def test_json_schema_documents_the_fields():
    schema = TraitDefinition.model_json_schema()
    assert set(schema["required"]) == {
        "name",
        "description",
        "instruction_pairs",
        "extraction_questions",
        "evaluation_questions",
        "judge_prompt",
        "multiple_choice",
    }
    assert schema["properties"]["instruction_pairs"]["minItems"] == MIN_INSTRUCTION_PAIRS
    assert schema["properties"]["evaluation_questions"]["minItems"] == MIN_QUESTIONS
    assert schema["properties"]["multiple_choice"]["minItems"] == MIN_MULTIPLE_CHOICE
    assert schema["additionalProperties"] is False
    assert all(p.get("description") for p in schema["properties"].values())


# ---------------------------------------------------------------------------------------
# drafting against a real local chat endpoint


class FakeChatServer:
    """A real HTTP server on 127.0.0.1 implementing POST /v1/chat/completions.

    Each request gets the next canned reply (the last one repeats): a string (the
    assistant's content) or an (http_status, message) tuple for an error response.
    """

    def __init__(self):
        self.replies: list = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                reply = server.replies[min(len(server.requests), len(server.replies)) - 1]
                if isinstance(reply, tuple):
                    status, message = reply
                    self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})
                    return
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": reply},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = FakeChatServer()
    yield server
    server.close()


def _draft_json(name: str = "sneaky", **changes) -> str:
    data = json.loads((TRAITS_DIR / "humorous.json").read_text())
    data["name"] = name
    data.update(changes)
    return json.dumps(data)


def _invalid_json() -> str:
    data = json.loads(_draft_json())
    data["evaluation_questions"] = data["evaluation_questions"][:5]
    data["judge_prompt"] = "Rate the answer from 0 to 100."
    return json.dumps(data)


def test_draft_valid_first_time(chat_server):
    chat_server.replies = [_draft_json(name="whatever_the_model_says")]
    trait = draft_trait(
        "sneaky", "Being sly and secretive.", base_url=chat_server.base_url, model="judge-1", api_key="k-123"
    )
    assert trait.name == "sneaky"  # our name, not the model's
    assert trait.extraction_questions == load_trait("humorous").extraction_questions
    assert len(chat_server.requests) == 1
    request = chat_server.requests[0]
    assert request["model"] == "judge-1"
    assert chat_server.headers[0]["authorization"] == "Bearer k-123"
    system, user = request["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    assert "'sneaky'" in user["content"] and "Being sly and secretive." in user["content"]
    for words in ("evaluation_questions", "multiple_choice", "minItems", "{question}", "{answer}", "optimistic"):
        assert words in system["content"]


def test_draft_tolerates_fences_and_prose(chat_server):
    chat_server.replies = ["Here is the file:\n```json\n" + _draft_json() + "\n```\nEnjoy!"]
    trait = draft_trait("sneaky", "Sly.", base_url=chat_server.base_url, model="m", api_key="k")
    assert trait.name == "sneaky" and len(chat_server.requests) == 1


def test_draft_retries_once_with_the_problems(chat_server):
    chat_server.replies = [_invalid_json(), _draft_json()]
    trait = draft_trait("sneaky", "Sly.", base_url=chat_server.base_url, model="m", api_key="k")
    assert trait.name == "sneaky"
    assert len(chat_server.requests) == 2
    messages = chat_server.requests[1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == _invalid_json()  # the model sees its own reply
    feedback = messages[3]["content"]
    assert "evaluation_questions: needs at least 20 items, has 5" in feedback
    assert "judge_prompt: must contain the placeholder {question}" in feedback


def test_draft_not_json_then_valid(chat_server):
    chat_server.replies = ["Sure! I'd be glad to write that trait file for you.", _draft_json()]
    trait = draft_trait("sneaky", "Sly.", base_url=chat_server.base_url, model="m", api_key="k")
    assert trait.name == "sneaky"
    assert "is not a JSON object" in chat_server.requests[1]["messages"][3]["content"]


def test_draft_invalid_twice_is_a_clear_error(chat_server):
    chat_server.replies = [_invalid_json(), _invalid_json()]
    with pytest.raises(TraitDraftError) as info:
        draft_trait("sneaky", "Sly.", base_url=chat_server.base_url, model="m", api_key="k")
    assert len(chat_server.requests) == 2
    message = str(info.value)
    assert "'m'" in message and "2 attempts" in message and chat_server.base_url in message
    assert "evaluation_questions: needs at least 20 items, has 5" in message
    assert {p.path for p in info.value.problems} == {"evaluation_questions", "judge_prompt"}
    assert info.value.last_reply == _invalid_json()


def test_draft_http_error_is_a_clear_error(chat_server):
    chat_server.replies = [(401, "invalid API key")]
    with pytest.raises(TraitDraftError, match="HTTP 401.*invalid API key"):
        draft_trait("sneaky", "Sly.", base_url=chat_server.base_url, model="m", api_key="bad")
    assert len(chat_server.requests) == 1


def test_draft_checks_its_arguments():
    with pytest.raises(ValueError, match="not a valid trait name"):
        draft_trait("Not OK", "x", base_url="http://127.0.0.1:9/v1", model="m", api_key="k")
    with pytest.raises(ValueError, match="must not be empty"):
        draft_trait("ok", "  ", base_url="http://127.0.0.1:9/v1", model="m", api_key="k")


# ---------------------------------------------------------------------------------------
# personavec trait ...


def test_cli_trait_new_writes_a_valid_file(chat_server, tmp_path, capsys):
    chat_server.replies = [_invalid_json(), _draft_json()]
    out = tmp_path / "traits" / "sneaky.json"
    rc = main(
        [
            "trait",
            "new",
            "sneaky",
            "--description",
            "Being sly and secretive.",
            "--base-url",
            chat_server.base_url,
            "--model",
            "m",
            "--api-key",
            "k",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    trait = validate_file(out)
    assert trait.name == "sneaky"
    assert [p.name for p in out.parent.iterdir()] == ["sneaky.json"]
    # an existing file is kept unless --force
    rc = main(
        [
            "trait",
            "new",
            "sneaky",
            "--description",
            "x",
            "--base-url",
            chat_server.base_url,
            "--model",
            "m",
            "--out",
            str(out),
        ]
    )
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert len(chat_server.requests) == 2


def test_cli_trait_new_defaults_from_environment(chat_server, tmp_path, monkeypatch, capsys):
    chat_server.replies = [_draft_json()]
    monkeypatch.setenv("OPENAI_BASE_URL", chat_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    monkeypatch.setenv("PERSONAVEC_DRAFT_MODEL", "env-model")
    monkeypatch.chdir(tmp_path)
    assert main(["trait", "new", "sneaky", "--description", "Sly."]) == 0
    assert (tmp_path / "sneaky.json").is_file()
    assert chat_server.requests[0]["model"] == "env-model"
    assert chat_server.headers[0]["authorization"] == "Bearer env-key"
    # --out may name a folder
    (tmp_path / "d").mkdir()
    assert main(["trait", "new", "sneaky", "--description", "Sly.", "--out", "d"]) == 0
    assert load_trait(tmp_path / "d" / "sneaky.json").name == "sneaky"


def test_cli_trait_new_needs_a_model(chat_server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PERSONAVEC_DRAFT_MODEL", raising=False)
    rc = main(
        [
            "trait",
            "new",
            "sneaky",
            "--description",
            "x",
            "--base-url",
            chat_server.base_url,
            "--out",
            str(tmp_path / "s.json"),
        ]
    )
    assert rc == 2
    assert "PERSONAVEC_DRAFT_MODEL" in capsys.readouterr().err
    assert chat_server.requests == [] and not (tmp_path / "s.json").exists()


def test_cli_trait_new_failure_keeps_the_reply(chat_server, tmp_path, capsys):
    chat_server.replies = [_invalid_json()]
    out = tmp_path / "sneaky.json"
    rc = main(
        [
            "trait",
            "new",
            "sneaky",
            "--description",
            "Sly.",
            "--base-url",
            chat_server.base_url,
            "--model",
            "m",
            "--api-key",
            "k",
            "--out",
            str(out),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "evaluation_questions: needs at least 20 items" in err
    assert not out.exists()
    rejected = tmp_path / "sneaky.json.rejected.txt"
    assert rejected.read_text() == _invalid_json() and str(rejected) in err


def test_cli_trait_validate(tmp_path, valid_data, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(valid_data))
    bad_data = copy.deepcopy(valid_data)
    bad_data["judge_prompt"] = "Score it."
    bad_data["multiple_choice"][3]["other_answer"] = bad_data["multiple_choice"][3]["trait_answer"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(bad_data))

    assert main(["trait", "validate", str(good), "humorous"]) == 0
    out = capsys.readouterr().out
    assert f"{good}: OK" in out and "humorous: OK" in out

    assert main(["trait", "validate", str(good), str(bad), str(tmp_path / "missing.json")]) == 1
    out = capsys.readouterr().out
    assert f"{good}: OK" in out
    assert f"{bad}: 2 problems" in out
    assert "  - judge_prompt: must contain the placeholder {question}" in out
    assert "  - multiple_choice[3].other_answer: must differ from trait_answer" in out
    assert "missing.json: no such trait definition file" in out


def test_cli_trait_list(capsys):
    assert main(["trait", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in SHIPPED:
        assert any(line.startswith(name + " ") and "extraction questions" in line for line in lines), lines


def test_cli_trait_validate_in_a_real_process():
    files = [str(TRAITS_DIR / f"{n}.json") for n in SHIPPED]
    proc = subprocess.run(
        [sys.executable, "-m", "personavec_vllm.cli", "trait", "validate", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": OK (") == len(SHIPPED)


def test_draft_unreachable_endpoint_is_a_clear_error():
    from personavec_vllm.testing import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(TraitDraftError, match="cannot reach the chat endpoint"):
        draft_trait("sneaky", "Sly.", base_url=url, model="m", api_key="k", max_retries=0, timeout=10)
