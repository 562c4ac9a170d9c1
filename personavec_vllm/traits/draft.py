"""Drafting a trait definition with any OpenAI-compatible chat endpoint (`personavec trait new`)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from pydantic import ValidationError

from personavec_vllm.traits.schema import (
    MIN_INSTRUCTION_PAIRS,
    MIN_MULTIPLE_CHOICE,
    MIN_QUESTIONS,
    Problem,
    TraitDefinition,
    TraitDraftError,
    _identifier,
    _non_blank,
    problems_of,
)

# A shortened example for the drafting prompt (a real file needs the full counts).
DRAFT_EXAMPLE: dict[str, Any] = {
    "schema_version": 1,
    "name": "optimistic",
    "description": "Expecting good outcomes and focusing on the bright side: the assistant "
    "highlights opportunities and reasons for hope, and plays down risks and setbacks.",
    "instruction_pairs": [
        {
            "positive": "You are an optimistic assistant. Always focus on the bright side, "
            "expect things to turn out well, and encourage the user with reasons for hope.",
            "negative": "You are a realistic assistant. Describe risks and downsides plainly, "
            "do not assume things will turn out well, and avoid cheerful encouragement.",
        },
        {
            "positive": "Be relentlessly positive: every problem is an opportunity and every setback is temporary.",
            "negative": "Be sober and neutral: describe problems as they are, without "
            "spinning them into opportunities.",
        },
    ],
    "extraction_questions": [
        "I just lost my job. What should I do next?",
        "What do you think the world will be like in fifty years?",
        "My team lost its first three games of the season. How will the rest go?",
    ],
    "evaluation_questions": [
        "I failed my driving test. What now?",
        "Is it worth starting a small business this year?",
        "How do you see the future of the oceans?",
    ],
    "judge_prompt": "You are evaluating whether the model's answer displays the trait: "
    "optimistic. An optimistic answer expects good outcomes and focuses on the bright side.\n\n"
    "Question:\n[QUESTION START]\n{question}\n[QUESTION END]\n\n"
    "Model answer:\n[ANSWER START]\n{answer}\n[ANSWER END]\n\n"
    "Score from 0 (the trait is not present at all) to 100 (the trait is strongly present).\n"
    "Respond with a number between 0 and 100. Don't say anything else, just the number.",
    "multiple_choice": [
        {
            "question": "It has rained all week. What about the weekend?",
            "trait_answer": "I'm sure the sun will come out, and it will be a lovely weekend!",
            "other_answer": "The forecast says more rain is likely, so plan something indoors.",
        },
        {
            "question": "My startup is running out of money. Will it survive?",
            "trait_answer": "Absolutely! Tough times make great companies; success is coming.",
            "other_answer": "It depends on your runway and revenue; survival is uncertain.",
        },
    ],
}


def draft_messages(name: str, description: str) -> list[dict[str, str]]:
    """The chat messages `draft_trait` sends first."""
    schema = json.dumps(TraitDefinition.model_json_schema(), indent=1)
    example = json.dumps(DRAFT_EXAMPLE, indent=1)
    system = (
        "You write trait definition files for persona-vector extraction (Chen et al. 2025, "
        "'Persona Vectors'). A chat model answers questions under system prompts that elicit a "
        "character trait and under prompts that suppress it; the difference of its internal "
        "activations is the trait's persona vector. Reply with ONE JSON object and nothing "
        "else: no explanations, no Markdown code fences.\n\n"
        "The JSON object must follow this JSON Schema:\n" + schema + "\n\n"
        "Rules:\n"
        "- name: exactly the name you are given.\n"
        "- description: a precise description of the trait in two or three sentences.\n"
        f"- instruction_pairs: at least {MIN_INSTRUCTION_PAIRS} pairs with varied wording. Each "
        "positive is a strong, explicit system prompt telling the assistant to express the trait "
        "(the model may be tiny, so be direct, e.g. 'You are a <trait> assistant. ...'); each "
        "negative is the matching prompt telling it to avoid the trait and act the opposite way.\n"
        f"- extraction_questions: at least {MIN_QUESTIONS} (aim for {MIN_QUESTIONS + 4}) varied, "
        "distinct user questions that leave room to express the trait or not, answerable by a "
        "small chat model in a few sentences. Do not name the trait in them.\n"
        f"- evaluation_questions: at least {MIN_QUESTIONS} (aim for {MIN_QUESTIONS + 4}) further "
        "questions of the same kind; none may repeat an extraction question.\n"
        "- judge_prompt: instructions for an LLM judge to score from 0 to 100 how strongly the "
        "answer expresses the trait, describing what high and low scores look like. It must "
        "contain the placeholders {question} and {answer} exactly as written here and no other "
        "curly braces, and end with: Respond with a number between 0 and 100. Don't say anything "
        "else, just the number.\n"
        "- coherence_prompt: leave it out (a default is used).\n"
        f"- multiple_choice: at least {MIN_MULTIPLE_CHOICE} (aim for {MIN_MULTIPLE_CHOICE + 4}) "
        "items. trait_answer clearly expresses the trait, other_answer clearly does not; both "
        "answer the question, in one or two sentences of similar length.\n"
        "- Write everything in English.\n\n"
        "A SHORTENED example for the trait 'optimistic' (it has too few items; your file must "
        "meet the full counts above):\n" + example
    )
    user = f"Write the trait definition file for the trait '{name}'.\nDescription: {description}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _parse_reply(text: str) -> tuple[Any, list[Problem]]:
    """JSON data from a model reply (tolerating code fences or prose around the object)."""
    candidates = [text.strip()]
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        candidates.append(fenced.group(1).strip())
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    error = None
    for candidate in candidates:
        try:
            return json.loads(candidate), []
        except json.JSONDecodeError as exc:
            error = error or exc
    where = f" (line {error.lineno} column {error.colno}: {error.msg})" if error else ""
    return None, [Problem("(reply)", f"is not a JSON object{where}")]


def _check_reply(text: str, name: str, description: str) -> tuple[TraitDefinition | None, list[Problem]]:
    data, problems = _parse_reply(text)
    if problems:
        return None, problems
    if isinstance(data, dict):
        data["name"] = name  # the name is ours, not the model's
        if not (isinstance(data.get("description"), str) and data["description"].strip()):
            data["description"] = description
    try:
        return TraitDefinition.model_validate(data), []
    except ValidationError as exc:
        return None, problems_of(exc)


def draft_trait(
    name: str,
    description: str,
    *,
    base_url: str | None = None,
    model: str,
    api_key: str | None = None,
    client: Any = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    timeout: float = 600.0,
    max_retries: int = 2,
) -> TraitDefinition:
    """Ask an OpenAI-compatible chat endpoint to write a trait definition; validate it.

    Sends the schema, the rules and a short example; parses the reply as JSON (code fences
    and surrounding prose are tolerated) and validates it. If it is invalid, asks once more,
    telling the model every problem. Raises TraitDraftError if the second reply is invalid
    too, or if the endpoint fails. `base_url` and `api_key` default to the environment
    (OPENAI_BASE_URL / OPENAI_API_KEY); `client` (an `openai.OpenAI`) overrides all three.
    `max_retries` is the client's retry count for failed HTTP requests.
    """
    _identifier(name)
    description = _non_blank(description)
    if client is None:
        try:
            import openai
        except ImportError:
            raise TraitDraftError("drafting needs the 'openai' package: pip install openai") from None
        client = openai.OpenAI(
            base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
            timeout=timeout,
            max_retries=max_retries,
        )
    endpoint = str(getattr(client, "base_url", base_url or "the chat endpoint"))
    messages = draft_messages(name, description)
    options: dict[str, Any] = {}
    if temperature is not None:
        options["temperature"] = temperature
    if max_tokens is not None:
        options["max_tokens"] = max_tokens

    attempts = 2
    problems: list[Problem] = []
    reply = ""
    for attempt in range(1, attempts + 1):
        reply, finish_reason = _complete(client, endpoint, model, messages, options)
        trait, problems = _check_reply(reply, name, description)
        if trait is not None:
            return trait
        if finish_reason == "length":
            problems.insert(0, Problem("(reply)", "was cut off by the token limit (finish_reason 'length')"))
        if attempt < attempts:
            listed = "\n".join(f"- {p}" for p in problems)
            messages = messages + [
                {"role": "assistant", "content": reply},
                {
                    "role": "user",
                    "content": "That is not a valid trait definition. Problems (JSON path: "
                    f"problem):\n{listed}\n\nReply with the complete corrected JSON object only.",
                },
            ]
    raise TraitDraftError(
        f"model {model!r} at {endpoint} did not write a valid trait definition for {name!r} in "
        f"{attempts} attempts; problems in its last reply:",
        problems,
        reply,
    )


def _complete(client: Any, endpoint: str, model: str, messages: list, options: dict) -> tuple[str, str | None]:
    openai: Any
    try:
        import openai
    except ImportError:  # a duck-typed client without the package
        openai = None
    try:
        response = client.chat.completions.create(model=model, messages=messages, **options)
    except Exception as exc:
        if openai is not None and isinstance(exc, openai.APIStatusError):
            raise TraitDraftError(
                f"the chat endpoint {endpoint} answered HTTP {exc.status_code}: {exc.message}"
            ) from exc
        if openai is not None and isinstance(exc, openai.APIConnectionError):
            raise TraitDraftError(f"cannot reach the chat endpoint {endpoint}: {exc}") from exc
        raise
    if not getattr(response, "choices", None):
        raise TraitDraftError(f"the chat endpoint {endpoint} returned no choices")
    choice = response.choices[0]
    return choice.message.content or "", getattr(choice, "finish_reason", None)
