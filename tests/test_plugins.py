"""Plug-in registries import a module when its key is first looked up; a profile's plug-in keys are
validated by the chosen plug-in alone, with the errors a tagged union gives."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import ValidationError

from agent.config.base import PluginChoice, Strict, adapter
from agent.util.plugins import Plugins

GOOD = (
    "from dataclasses import dataclass\nfrom typing import Literal\nfrom agent.config.base import Strict\n"
    'KEY = "{key}"\n\n\n@dataclass(frozen=True, kw_only=True)\nclass Config(Strict):\n    type: Literal["{key}"]\n'
    "    rate: int = 1\n"
)


@pytest.fixture
def package(tmp_path: Path) -> Iterator[str]:
    """A package of three plug-ins: `good-one`, `other`, and `broken` (its import fails)."""
    name = f"plugpkg_{tmp_path.name.replace('-', '_')}"
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "good_one.py").write_text(GOOD.format(key="good-one"))
    (root / "other.py").write_text(GOOD.format(key="other"))
    (root / "broken.py").write_text("import no_such_module_here\n")
    (root / "liar.py").write_text('KEY = "somebody-else"\n')
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]


def test_a_registry_imports_a_plugin_on_its_first_lookup_only(package: str) -> None:
    plugins = Plugins(package, ("good_one", "other", "broken", "liar"))
    assert list(plugins) == ["good-one", "other", "broken", "liar"] and len(plugins) == 4
    assert "other" in plugins and "nope" not in plugins
    assert plugins.loaded() == [] and f"{package}.good_one" not in sys.modules
    assert plugins["good-one"].KEY == "good-one"
    assert plugins.loaded() == ["good-one"] and f"{package}.other" not in sys.modules
    with pytest.raises(KeyError):
        plugins["nope"]
    with pytest.raises(ImportError, match="no_such_module_here"):
        plugins["broken"]
    with pytest.raises(RuntimeError, match="claims type 'somebody-else'"):
        plugins["liar"]


def model(package: str) -> type[Strict]:
    plugins = Plugins(package, ("good_one", "other", "broken"))
    fields = [("source", Annotated[Any, PluginChoice(plugins)]), ("kind", Literal["x"], dataclasses.field(default="x"))]
    # made, not written: its annotations must be objects, as a module's are once pydantic resolves them
    return dataclasses.make_dataclass("Pipeline", fields, bases=(Strict,), frozen=True, kw_only=True)


def errors(cls: type[Strict], value: object) -> list[tuple[tuple[Any, ...], str, str]]:
    with pytest.raises(ValidationError) as caught:
        adapter(cls).validate_python({"source": value})
    return [(e["loc"], e["type"], e["msg"]) for e in caught.value.errors(include_url=False)]


def test_a_plugin_key_is_validated_by_the_plugin_its_type_names(package: str) -> None:
    cls = model(package)
    got = adapter(cls).validate_python({"source": {"type": "other", "rate": 3}}).source  # type: ignore[attr-defined]
    assert type(got).__module__ == f"{package}.other" and got.rate == 3
    assert f"{package}.good_one" not in sys.modules  # never named: never imported
    assert adapter(cls).validate_python({"source": got}).source is got  # type: ignore[attr-defined]  # a built config is kept
    # the plug-in's own errors, under the key
    assert errors(cls, {"type": "other", "rate": "fast", "extra": 1}) == [
        (("source", "rate"), "int_parsing", "Input should be a valid integer, unable to parse string as an integer"),
        (("source", "extra"), "unexpected_keyword_argument", "Unexpected keyword argument"),
    ]


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ({"type": "nope"}, "union_tag_invalid"),
        ({"type": 5}, "union_tag_invalid"),
        ({"rate": 1}, "union_tag_not_found"),
        ("other", "dict_type"),
        ([{"type": "other"}], "dict_type"),
        (None, "dict_type"),
    ],
)
def test_a_plugin_key_refuses_what_names_no_plugin(package: str, value: object, kind: str) -> None:
    [(loc, got, _)] = errors(model(package), value)
    assert (loc, got) == (("source",), kind)


def test_a_plugin_that_cannot_load_is_refused_where_it_is_named_and_nowhere_else(package: str) -> None:
    cls = model(package)
    [(loc, kind, message)] = errors(cls, {"type": "broken"})
    assert (loc, kind) == (("source",), "value_error")
    assert message == "Value error, the 'broken' plug-in cannot load here: No module named 'no_such_module_here'"
    assert adapter(cls).validate_python({"source": {"type": "other"}}).source.rate == 1  # type: ignore[attr-defined]


def test_the_schema_offers_every_plugin_that_loads(package: str) -> None:
    schema = adapter(model(package)).json_schema()
    source = schema["properties"]["source"]
    assert source["discriminator"]["propertyName"] == "type"
    tags = [
        schema["$defs"][branch["$ref"].rsplit("/", 1)[1]]["properties"]["type"]["const"] for branch in source["oneOf"]
    ]
    assert tags == ["good-one", "other"]
