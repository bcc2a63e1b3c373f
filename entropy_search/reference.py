"""The configuration reference (docs/configuration.md), generated from the schemas of a search and of a sweep:
every key with its type, default and description, so the documentation cannot drift from the code.

    python -m entropy_search.reference > docs/configuration.md      # or: make docs

tests/test_config.py fails when the file is not what this module generates.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import AfterValidator, BaseModel

from . import config
from .sweep.schema import SweepConfig

_BOUNDS = {annotated_types.Gt: ("gt", "> {}"), annotated_types.Ge: ("ge", ">= {}"), annotated_types.Lt: ("lt", "< {}"),
           annotated_types.Le: ("le", "<= {}"), annotated_types.MinLen: ("min_length", "at least {} long")}

HEADER = """# Configuration reference

Generated from the schemas (`entropy_search/config.py`, `entropy_search/sweep/schema.py`) by
`python -m entropy_search.reference > docs/configuration.md` (`make docs`); a test fails when it is stale. Every key
is optional unless marked required; unknown keys are errors. A search config is YAML (`entropy-search search
CONFIG.yaml`, `--set key=value` for one key); `entropy-search search --print-schema` prints the same keys as a YAML
template.
"""


def _constraints(metadata: list[Any]) -> list[str]:
    out = []
    for item in metadata:
        if isinstance(item, AfterValidator) and item.func in config.VALIDATOR_RULES:
            out.append(config.VALIDATOR_RULES[item.func])
        for kind, (attribute, text) in _BOUNDS.items():
            if isinstance(item, kind):
                out.append(text.format(getattr(item, attribute)))
        for inner in getattr(item, "metadata", []):  # a Field(...) inside Annotated
            out.extend(_constraints([inner]))
    return out


def type_name(annotation: Any, metadata: list[Any] = ()) -> str:
    """A type as a reader writes it in YAML: `float, in (0, 1]`, `one of: macs, latency`, `list of int (> 0)`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return type_name(args[0], [*args[1:], *metadata])
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        text = " or ".join(names) + (" or null" if type(None) in args else "")
    elif origin is Literal:
        text = "one of: " + ", ".join(json.dumps(a) if not isinstance(a, str) else a for a in args)
    elif origin is tuple and len(args) == 2 and args[0] == args[1]:
        text = f"[low, high] of {type_name(args[0])}"
    elif origin in (list, tuple):
        text = f"list of {type_name(args[0])}" if args else "list"
    elif origin is dict:
        text = f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    elif annotation is Any:
        text = "any"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    constraints = _constraints(list(metadata))
    return f"{text} ({', '.join(constraints)})" if constraints else text


def _default(field) -> str:
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return ""
    return f"`{json.dumps(default)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def section_tables(root: type[BaseModel], prefix: str = "") -> list[str]:
    """One Markdown table per section of `root` (nested sections get their own, under their dotted name)."""
    rows, nested = [], []
    for name, field in root.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((f"{prefix}{name}", ann, field.description or ann.__doc__ or ""))
            continue
        value = typing.get_args(ann)[-1] if typing.get_origin(ann) is dict else None
        if isinstance(value, type) and issubclass(value, BaseModel):  # a mapping of sections (a sweep's axes)
            nested.append((f"{prefix}{name}.<key>", value, value.__doc__ or ""))
        rows.append(f"| `{prefix}{name}` | {_cell(type_name(ann, field.metadata))} | {_default(field)} | "
                    f"{_cell(field.description or '')} |")
    lines = []
    if rows:
        lines += ["| key | type | default | description |", "|---|---|---|---|", *rows, ""]
    for dotted, model, doc in nested:
        lines += [f"### `{dotted}`", "", _cell(doc), "", *section_tables(model, dotted + ".")]
    return lines


def configuration_reference() -> str:
    """The whole of docs/configuration.md."""
    lines = [HEADER, "## A search (`entropy-search search CONFIG.yaml`)", "",
             _cell(config.SearchConfig.__doc__ or ""), "", *section_tables(config.SearchConfig),
             "## A sweep (`entropy-search sweep tune_configs/NAME.yaml`)", "",
             _cell(SweepConfig.__doc__ or ""), "", *section_tables(SweepConfig)]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(configuration_reference(), end="")
