"""The proof on the embedded default model with the official SDK: `parse()` with five Pydantic
schemas, json_object answers that parse, required tool calls whose arguments validate, and
streamed == non-streamed at temperature 0."""
from __future__ import annotations

import json
from enum import Enum

import pytest
from pydantic import BaseModel, Field

from tests.structured.conftest import DEFAULT_NAME


class Address(BaseModel):
    city: str = Field(max_length=40)
    country: str = Field(max_length=40)


class Person(BaseModel):             # nested objects
    name: str = Field(max_length=40)
    address: Address


class ShoppingList(BaseModel):       # arrays
    items: list[str] = Field(min_length=1, max_length=4)


class Mood(str, Enum):
    positive = "positive"
    negative = "negative"
    neutral = "neutral"


class Sentiment(BaseModel):          # enums
    label: Mood


class Book(BaseModel):               # optional fields
    title: str = Field(max_length=60)
    year: int | None = Field(default=None, ge=0, le=2100)
    subtitle: str | None = Field(default=None, max_length=60)


class Rating(BaseModel):             # numbers with bounds
    stars: int = Field(ge=1, le=5)
    confidence: float = Field(ge=0.0, le=1.0)


CASES = [
    (Person, "Invent a person who lives in Paris, France. Answer in JSON."),
    (ShoppingList, "List three fruits to buy. Answer in JSON."),
    (Sentiment, "Classify the sentiment of: 'I love this phone!' Answer in JSON."),
    (Book, "Name a famous novel and its year. Answer in JSON."),
    (Rating, "Rate the movie Titanic from 1 to 5 stars. Answer in JSON."),
]


@pytest.mark.parametrize("schema, prompt", CASES, ids=[c[0].__name__ for c in CASES])
def test_parse_returns_the_schema_object(default_client, schema, prompt):
    completion = default_client.chat.completions.parse(
        model=DEFAULT_NAME, messages=[{"role": "user", "content": prompt}], response_format=schema,
        max_tokens=120, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, schema), choice.message.content
    assert completion.usage.completion_tokens > 0
    # constrained requests still report their sparsity
    assert 0 < completion.usage.model_extra["ffn_sparsity"] < 1


def test_json_object_answers_parse(default_client):
    for prompt in ("Describe a cat in JSON.", "hello"):
        completion = default_client.chat.completions.create(
            model=DEFAULT_NAME, messages=[{"role": "user", "content": prompt}],
            response_format={"type": "json_object"}, max_tokens=80, temperature=0)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Current local time in a time zone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
                   "required": ["timezone"], "additionalProperties": False}}}



class WeatherArguments(BaseModel, extra="forbid"):
    city: str = Field(max_length=40)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


class TimeArguments(BaseModel, extra="forbid"):
    timezone: str = Field(max_length=40)


def test_required_tool_calls_validate(default_client):
    completion = default_client.chat.completions.create(
        model=DEFAULT_NAME, messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", parallel_tool_calls=False,
        max_tokens=120, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    assert choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        model = {"get_weather": WeatherArguments, "get_time": TimeArguments}[call.function.name]
        model.model_validate_json(call.function.arguments)


@pytest.mark.parametrize("kwargs", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "Rating",
                                                                "schema": Rating.model_json_schema()}}},
    {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
], ids=["json_schema", "tool_named"])   # required calls stream as parsed at the end: tests/structured/test_tools.py
def test_stream_equals_non_stream(default_client, kwargs):
    messages = [{"role": "user", "content": "What's the weather in Rome? Rate it from 1 to 5."}]
    whole = default_client.chat.completions.create(model=DEFAULT_NAME, messages=messages, max_tokens=60,
                                                   temperature=0, **kwargs).choices[0]
    with default_client.chat.completions.stream(model=DEFAULT_NAME, messages=messages, max_tokens=60,
                                                temperature=0, **kwargs) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == whole.finish_reason
    assert streamed.message.content == whole.message.content
    calls = lambda m: [(c.function.name, c.function.arguments) for c in m.tool_calls or []]  # noqa: E731
    assert calls(streamed.message) == calls(whole.message)
