"""The one family registry: which model families exist, what each serves, which one a checkpoint is.

A family is a sub-package of `vllm_omni_plugin.families` whose `__init__.py`
holds only its `FAMILY = Family(...)` declaration (names and "module:attr"
strings, no heavy imports). `families()` finds them with `pkgutil` over that
package's path and imports nothing but those `__init__` modules; a family's
code is imported when something asks for it (`load(target)`), the way vLLM's
ModelRegistry keeps "module:Class" strings until an architecture is built.
Adding a family is adding its folder: no table here or anywhere else names it.

This module imports neither vLLM, torch nor diffusers: plugin start-up, the
CLI and the server's checkpoint detection read it in every process.
"""

from __future__ import annotations

import functools
import dataclasses
import importlib
import importlib.util
import json
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

#: The package whose sub-packages are the families.
FAMILIES_PACKAGE = "vllm_omni_plugin.families"


@dataclass(frozen=True)
class VllmModel:
    """An architecture the family runs inside vLLM's engine (registered in vLLM's ModelRegistry).

    architecture  the name config.json carries (vLLM's registry key)
    target        "module:Class" of the vLLM model class
    mm_prefix     its image tokens attend bidirectionally (patches/is_mm_prefix_lm.py)
    summary       one line for `vllm-omni doctor` and the plugin's log
    """

    architecture: str
    target: str
    mm_prefix: bool
    summary: str


@dataclass(frozen=True)
class Param:
    """A request field a family adds to the shared vocabulary (`SamplingParams`, `ResolvedParams`,
    the wire bodies): a number that means the same to every model that reads it.

    A model reads it only where its `Capabilities.fields` says so; a request that sets it for
    another model is refused, naming it. Several families may declare one name, with equal
    declarations (FLUX and Qwen-Image both run true CFG).

    type         int or float
    description  what it does (the OpenAPI document, the playground)
    ge, le       its bounds on the wire (inclusive); an int with ge=1 is "a positive integer"
    aliases      other wire / keyword names of the same field (give one of them)
    """

    type: type
    description: str
    ge: float | None = None
    le: float | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in (int, float):
            raise TypeError(f"a Param's type is int or float, got {self.type!r}")


@dataclass(frozen=True)
class Family:
    """Everything the generic layers need to know about one model family, as names and lazy targets.

    A target is "module:attr"; a module starting with "." is relative to the
    family's package (`.pipeline:QwenImageStepwise`), any other is absolute.

    name              the family package's name (set by discovery from the folder)
    summary           one line: what the family is
    pipelines         diffusers pipeline class names (model_index.json `_class_name`)
                      -> its step-wise class; the class's `variant_for(pipe)` may pick
                      another class (or none: the generic fallback) from the loaded
                      pipeline's config
    stages            checkpoint names (config.json `architectures`, or a diffusers
                      `_class_name`) that run in several stages -> the class of the
                      final (diffusion) stage; its `capabilities` is the family's
                      declaration for requests
    orchestrator      multi-stage families: the StageOrchestrator subclass that runs
                      the stages (orchestrator/stages.py)
    input_processor   the name stage configs use for it (`input_processor: ...`)
    stage_config      the family's shipped stage config, a YAML file in its folder
    params            request fields the family adds to the shared vocabulary, name -> Param
                      (defaults are its pipelines' own: `PipelineDefaults`)
    vllm_models       architectures registered in vLLM's ModelRegistry
    vllm_setup        "module:function" run once per process before vLLM parses
                      engine args (BAGEL's config hook); None: nothing
    model_types       config.json `model_type`s that identify the family's checkpoints
    llm_config_key    the config.json key holding the AR stage's language-model config,
                      where it is not transformers' `text_config` (BAGEL: llm_config)
    checkpoints       factory names (`vllm-omni make-checkpoint NAME`) -> the
                      "module:build" that writes one (checkpoints/__init__.py)
    device_checkpoints  the factory names whose builder draws weights on a GPU too
    docs              the family's docs page (repository path)
    """

    summary: str
    pipelines: Mapping[str, str] = field(default_factory=dict)
    stages: Mapping[str, str] = field(default_factory=dict)
    orchestrator: str | None = None
    input_processor: str | None = None
    stage_config: str | None = None
    params: Mapping[str, Param] = field(default_factory=dict)
    vllm_models: tuple[VllmModel, ...] = ()
    vllm_setup: str | None = None
    model_types: tuple[str, ...] = ()
    llm_config_key: str | None = None
    checkpoints: Mapping[str, str] = field(default_factory=dict)
    device_checkpoints: tuple[str, ...] = ()
    docs: str | None = None
    name: str = ""
    package: str = ""

    def __post_init__(self) -> None:
        if (self.orchestrator is None) != (self.input_processor is None):
            raise ValueError(f"family {self.name or self.summary!r}: orchestrator and input_processor come together")
        if self.stages and self.orchestrator is None:
            raise ValueError(f"family {self.name or self.summary!r}: multi-stage `stages` need an orchestrator")
        unknown = set(self.device_checkpoints) - set(self.checkpoints)
        if unknown:
            raise ValueError(f"family {self.name!r}: device_checkpoints {sorted(unknown)} are not in its checkpoints")

    @property
    def multi_stage(self) -> bool:
        return self.orchestrator is not None

    def resolve(self, target: str) -> tuple[str, str]:
        """("absolute.module", "attr") of a target this family declares."""
        module, _, attr = target.partition(":")
        if not attr:
            raise ValueError(f"family {self.name!r}: target {target!r} is not 'module:attr'")
        return (f"{self.package}{module}" if module.startswith(".") else module), attr

    def load(self, target: str) -> Any:
        """Import and return the attribute `target` names (the family's code is imported here, on use)."""
        module, attr = self.resolve(target)
        return getattr(importlib.import_module(module), attr)

    def stage_config_path(self) -> Path | None:
        """The shipped stage config's file, or None."""
        if self.stage_config is None:
            return None
        spec = importlib.util.find_spec(self.package)
        return Path(next(iter(spec.submodule_search_locations))) / self.stage_config


@functools.cache
def families() -> dict[str, Family]:
    """Every family, by name: one `FAMILY` per sub-package of this package, nothing else imported."""
    package = importlib.import_module(FAMILIES_PACKAGE)
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{FAMILIES_PACKAGE}.{info.name}")
        declared = getattr(module, "FAMILY", None)
        if not isinstance(declared, Family):
            raise TypeError(f"{module.__name__} is a family folder but declares no FAMILY = Family(...)")
        found[info.name] = _named(declared, info.name, module.__name__)
    _check_unique(found)
    return found


def _named(declared: Family, name: str, package: str) -> Family:
    return dataclasses.replace(declared, name=name, package=package)


def _check_unique(found: Mapping[str, Family]) -> None:
    """Two families claiming one pipeline class, architecture or factory name is a bug: say which."""
    for what in ("pipelines", "stages", "checkpoints", "input_processor", "model_types"):
        owner: dict[str, str] = {}
        for fam in found.values():
            value = getattr(fam, what)
            keys = [value] if isinstance(value, str) else ([] if value is None else list(value))
            for key in keys:
                if key in owner:
                    raise ValueError(f"families {owner[key]!r} and {fam.name!r} both declare {what} {key!r}")
                owner[key] = fam.name


def family(name: str) -> Family:
    """The family called `name`; KeyError listing the known ones."""
    try:
        return families()[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(families())}") from None


# ---- one index per question the generic layers ask -------------------------------------
def _index(what: str) -> dict[str, Family]:
    return {key: fam for fam in families().values() for key in getattr(fam, what)}


def pipeline_target(class_name: str) -> tuple[Family, str] | None:
    """(family, target) of the step-wise class for a diffusers pipeline class name, or None."""
    fam = _index("pipelines").get(class_name)
    return None if fam is None else (fam, fam.pipelines[class_name])


def stage_family(names: list[str] | tuple[str, ...]) -> Family | None:
    """The multi-stage family one of these checkpoint names belongs to, or None."""
    index = _index("stages")
    return next((index[n] for n in names if n in index), None)


def input_processors() -> dict[str, Family]:
    """Stage-config `input_processor` names -> the family that registers it."""
    return {fam.input_processor: fam for fam in families().values() if fam.input_processor is not None}


def checkpoint_builders() -> dict[str, Family]:
    """Checkpoint-factory names -> the family whose builder writes them."""
    return _index("checkpoints")


@functools.cache
def pipeline_classes() -> tuple[type, ...]:
    """Every step-wise class the families declare (diffusers pipelines' and multi-stage final
    stages'), once each, in family order. Imports every family's pipeline module (on first use)."""
    targets = [(fam, t) for fam in families().values() for t in (*fam.pipelines.values(), *fam.stages.values())]
    return tuple(dict.fromkeys(fam.load(t) for fam, t in targets))


@functools.cache
def params() -> dict[str, Param]:
    """Every family-declared request field, by name (sorted); one name declared by several
    families must be declared alike, and no alias may shadow a field."""
    return merged_params(families())


def merged_params(found_families: Mapping[str, Family]) -> dict[str, Param]:
    """The params of these families, merged as `params` merges every family's (ValueError on a clash)."""
    found: dict[str, tuple[Param, str]] = {}
    for fam in found_families.values():
        for name, param in fam.params.items():
            if name in found and found[name][0] != param:
                raise ValueError(f"families {found[name][1]!r} and {fam.name!r} declare param {name!r} differently")
            found.setdefault(name, (param, fam.name))
    aliases = [a for p, _ in found.values() for a in p.aliases]
    clash = sorted(set(aliases) & set(found)) or sorted({a for a in aliases if aliases.count(a) > 1})
    if clash:
        raise ValueError(f"param alias {clash[0]!r} is declared twice or names a param")
    return {name: found[name][0] for name in sorted(found)}


def param_aliases() -> dict[str, str]:
    """Alias -> the family-declared field it names (`cfg_scale` -> `true_cfg_scale`)."""
    return {alias: name for name, p in params().items() for alias in p.aliases}


def vllm_models() -> tuple[VllmModel, ...]:
    """Every architecture the families register with vLLM, its target made absolute ("module:Class",
    as vLLM's ModelRegistry imports it)."""
    return tuple(dataclasses.replace(m, target=":".join(fam.resolve(m.target)))
                 for fam in families().values() for m in fam.vllm_models)


# ---- which family is this checkpoint ---------------------------------------------------
@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory says it is.

    layout        "diffusers" (model_index.json), "transformers" (config.json) or None (neither)
    names         config.json `architectures`, or model_index.json `_class_name`
    model_type    config.json `model_type` (None for diffusers directories)
    family        the family that serves it, or None (a diffusers pipeline no family
                  declares runs through the generic fallback)
    """

    path: Path
    layout: Literal["diffusers", "transformers"] | None
    names: tuple[str, ...]
    model_type: str | None
    family: Family | None

    @property
    def kind(self) -> Literal["diffusion", "multi-stage"] | None:
        """"diffusion" (one diffusion engine), "multi-stage" (an AR stage in vLLM first), None (no checkpoint).

        A transformers directory always needs an AR stage; a diffusers one only
        when a multi-stage family claims its pipeline class (GLM-Image).
        """
        if self.layout is None:
            return None
        if self.family is not None and self.family.multi_stage:
            return "multi-stage"
        return "multi-stage" if self.layout == "transformers" else "diffusion"


def identify(path: str | Path) -> CheckpointInfo:
    """The one answer to "which family is this checkpoint directory".

    Args:
        path: a local checkpoint directory (a hub id must be resolved first, hub.py).

    Returns:
        its CheckpointInfo; `layout` None when the directory has neither
        model_index.json nor config.json.
    """
    path = Path(path)
    index, config = path / "model_index.json", path / "config.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name")
        names = (name,) if name else ()
        found = pipeline_target(name)[0] if name and pipeline_target(name) else stage_family(names)
        return CheckpointInfo(path, "diffusers", names, None, found)
    if config.is_file():
        data = json.loads(config.read_text())
        names = tuple(data.get("architectures") or ())
        model_type = data.get("model_type")
        found = stage_family(names)
        if found is None and model_type:
            found = next((f for f in families().values() if model_type in f.model_types), None)
        return CheckpointInfo(path, "transformers", names, model_type, found)
    return CheckpointInfo(path, None, (), None, None)
