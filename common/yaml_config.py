"""YAML config files: ``extends:`` inheritance, ``a.b=value`` overrides, strict pydantic validation.

Why this exists: a typo in a config key silently falls back to a default and wastes a training run.
Every key is therefore checked against the pydantic schema before any work starts, and an error names
the key, the file that set it and the closest valid key.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from common.errors import ConfigError, one_line

M = TypeVar("M", bound=BaseModel)
COMMAND_LINE = "<command line>"
MAX_NODES = 100_000  # values a config may expand to; real configs have a few hundred


MAX_DEPTH = 100  # nesting a config may have, its aliases expanded; real configs nest about 5 deep


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _expanded_shape(root: yaml.Node) -> tuple[int, int]:
    """(values, depth) that ``root`` stands for once every alias is expanded. Iterative and memoised
    per node, so a graph of shared aliases is measured in time linear in its nodes, and a deep one
    cannot exhaust Python's stack; a node inside itself counts once."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        kids = _children(node)
        if children_done:
            size[id(node)] = 1 + sum(size[id(k)] for k in kids)
            depth[id(node)] = 1 + max((depth[id(k)] for k in kids), default=0)
        elif id(node) not in size:
            size[id(node)], depth[id(node)] = 1, 1  # while it is measured
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in size)
    return size[id(root)], depth[id(root)]


def _event_depth(text: str, where: str) -> None:
    """Refuse a document nested past ``MAX_DEPTH`` before it is composed: PyYAML's composer (and
    everything after it) recurses once per level and would end in a RecursionError. The parser that
    yields the events keeps its own stack, so this pass is safe at any depth."""
    level = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            level += 1
            if level > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else 1
                raise ConfigError(f"{where}:{line}: the YAML nests more than {MAX_DEPTH} levels of lists or mappings "
                                  "(a config nests a few levels: flatten the value)")
        elif isinstance(event, yaml.CollectionEndEvent):
            level -= 1


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` that first refuses a document nested past ``MAX_DEPTH`` levels, or whose
    aliases expand past ``MAX_NODES`` values: a few hundred bytes of nested aliases can stand for
    billions of them."""
    _event_depth(text, where)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size, depth = _expanded_shape(node)
        if size > MAX_NODES:
            raise ConfigError(f"{where}: the YAML expands to more than {MAX_NODES:,} values through its &anchor / "
                              "*alias references (write the values out, or nest fewer aliases)")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: the YAML nests more than {MAX_DEPTH} levels through its &anchor / *alias "
                              "references (write the values out, or nest fewer aliases)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (check the path)")
    try:
        data = safe_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {one_line(exc, 10_000)} (fix the syntax)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc} (check the file and its permissions)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, found {type(data).__name__} "
                          "(start the file with keys such as dataset:, model:, trainer:)")
    return data


def _merge(base: dict[str, Any], top: dict[str, Any], origins: dict[str, str], source: str, prefix: str = "") -> None:
    """Deep-merge ``top`` into ``base`` in place, recording which source set each leaf key."""
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            origins.setdefault(dotted, source)
            _merge(base[key], value, origins, source, dotted + ".")
        else:
            base[key] = value
            for stale in [k for k in origins if k.startswith(dotted + ".")]:
                del origins[stale]
            origins[dotted] = source
            if isinstance(value, dict):
                _record(value, origins, source, dotted + ".")


def _record(tree: dict[str, Any], origins: dict[str, str], source: str, prefix: str) -> None:
    for key, value in tree.items():
        origins[f"{prefix}{key}"] = source
        if isinstance(value, dict):
            _record(value, origins, source, f"{prefix}{key}.")


def _load_tree(path: Path, origins: dict[str, str], chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: 'extends' forms a cycle: {cycle} (remove one of the extends)")
    raw = _read_yaml(path)
    parents = raw.pop("extends", None)
    merged: dict[str, Any] = {}
    if parents is not None:
        if isinstance(parents, str):
            parents = [parents]
        if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
            raise ConfigError(f"{path}: 'extends' must be a file path or a list of file paths")
        for parent in parents:
            if not (path.parent / parent).is_file():
                raise ConfigError(f"{path}: 'extends' names {parent}, which does not exist at {path.parent / parent} "
                                  f"(fix the path: it is relative to {path.parent})")
            parent_tree = _load_tree(path.parent / parent, origins, (*chain, path))
            _merge(merged, parent_tree, origins, str(path.parent / parent))
    _merge(merged, raw, origins, str(path))
    return merged


def apply_override(tree: dict[str, Any], override: str, origins: dict[str, str]) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML so ``3`` is an int."""
    if "=" not in override:
        raise ConfigError(f"{COMMAND_LINE}: override '{override}' is not an override (write key.sub=value)")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"{COMMAND_LINE}: override '{override}' has an empty key")
    try:
        value = safe_yaml(text, f"{COMMAND_LINE}: override '{override}'")
    except yaml.YAMLError as exc:
        raise ConfigError(f"{COMMAND_LINE}: override '{override}': value is not valid YAML: {exc}") from exc
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{COMMAND_LINE}: override '{override}': '{key}' is not a section")
        node = child
    _merge(node, {keys[-1]: value}, origins, COMMAND_LINE, ".".join(keys[:-1]) + "." if len(keys) > 1 else "")


def _unwrap(annotation: Any) -> list[Any]:
    """Candidate model/list types inside Optional/Union/list annotations."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    return [annotation]


def _is_tag(cand: Any, part: Any) -> bool:
    """Whether ``part`` is the tag that selects ``cand`` in a tagged union: its discriminator field's
    value, or its class name (the tag of a union told apart by a function)."""
    return isinstance(cand, type) and issubclass(cand, BaseModel) and (cand.__name__ == part or any(
        typing.get_origin(f.annotation) is typing.Literal and typing.get_args(f.annotation) == (part,)
        for f in cand.model_fields.values()))


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, list[Any]]:
    """The pydantic model class that owns the last element of ``loc``, and ``loc`` without the
    tags pydantic inserts for tagged unions (``model.dnn.hidden`` -> ``model.hidden``)."""
    current: list[Any] = [root]
    path: list[Any] = []
    for i, part in enumerate(loc):
        tagged = [c for c in current if _is_tag(c, part)]
        if tagged:
            current = tagged
            continue
        path.append(part)
        if i == len(loc) - 1:
            break
        nxt: list[Any] = []
        for cand in current:
            if isinstance(part, int) and typing.get_origin(cand) is list:
                nxt.extend(_unwrap(typing.get_args(cand)[0]))
            elif isinstance(part, str) and isinstance(cand, type) and issubclass(cand, BaseModel):
                field = cand.model_fields.get(part)
                if field is not None:
                    nxt.extend(_unwrap(field.annotation))
        current = nxt
    owner = next((c for c in current if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return owner, path


def _origin_of(dotted: str, origins: dict[str, str], default: str) -> str:
    key = dotted
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return default


def _describe(exc: ValidationError, model: type[BaseModel], origins: dict[str, str], default: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        owner, path = _walk(model, loc)
        named = [p for p in path if isinstance(p, str)]
        dotted = ".".join(str(p) for p in path)
        where = _origin_of(".".join(named), origins, default)
        if err["type"] == "extra_forbidden":
            valid = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"{where}: unknown key '{dotted}'{hint} (valid keys here: {', '.join(valid)})")
        else:
            got = err.get("input")
            shown = f"got {got!r}" if not isinstance(got, (dict, list)) else f"fix the '{dotted}' section"
            lines.append(f"{where}: key '{dotted}': {err['msg']} ({shown})")
    return "; ".join(lines)


def read_config(path: str | Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged key tree of ``path`` (following ``extends:``) with overrides, and where each key came from."""
    origins: dict[str, str] = {}
    tree = _load_tree(Path(path), origins, ())
    for override in overrides or []:
        apply_override(tree, override, origins)
    return tree, origins


def load_config(model: type[M], path: str | Path, overrides: list[str] | None = None) -> M:
    """Read ``path`` (following ``extends:``), apply overrides, validate against ``model``."""
    tree, origins = read_config(path, overrides)
    return validate_tree(model, tree, origins, str(path))


def validate_tree(model: type[M], tree: dict[str, Any], origins: dict[str, str], source: str) -> M:
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, model, origins, source)) from None


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two config trees (a key missing on one side counts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]
