"""Stage configs: which stages a model runs, where, and with what defaults.

A stage config is a YAML file (the plugin ships one per model family, in the
family's folder, `families/<family>/stage_config.yaml`; users pass their own with `--stage-config` or
`Omni(stage_config=...)`). The schema is the pydantic model below; unknown
keys are errors, and every error names the file, the field and what to write
instead, because a typo in a deployment file must not silently fall back to
a default.

    name: bagel
    architectures: [BagelForConditionalGeneration, OmniBagelForConditionalGeneration]
    stages:
      - id: ar                      # unique; referenced by `inputs_from`
        type: llm                   # llm: vLLM engine | diffusion: our engine
        engine_args: {...}          # passed to the stage's engine as-is
        platform_engine_args:       # merged over engine_args on that platform
          cpu: {...}                #   (cpu | cuda | rocm | xpu ...: vLLM's device type)
        subfolder: null             # checkpoint sub-folder the engine loads (GLM-Image: vision_language_encoder)
        tokenizer_subfolder: null   # and its tokenizer's (GLM-Image: processor)
        devices: "0"                # device ids, comma separated
        max_batch_size: 16          # llm: vLLM's max_num_seqs; diffusion: requests stepping together
        default_sampling_params: {...}
        connector: omni_kv          # how this stage's output reaches the next
        dit_options: {...}          # diffusion stages: cfg_degree, ulysses_degree,
                                    # ring_degree, quantization, compile (DitOptions)
      - id: dit
        type: diffusion
        inputs_from: ar
        input_processor: bagel_context   # a registered processor name
        final_output: true

Exactly one stage is final. Stage order is the list order; `inputs_from`
must name an earlier stage.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# omni_kv: the AR engine runs with the OmniKVConnector (KV cache + keyed metadata);
# inline: the AR stage's output (generated tokens) is handed over in-process.
CONNECTORS = ("omni_kv", "inline")


class StageConfigError(ValueError):
    """A stage config file is invalid; the message names the file, the field and the fix."""


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    type: Literal["llm", "diffusion"]
    engine_args: dict[str, Any] = Field(default_factory=dict)
    platform_engine_args: dict[str, dict[str, Any]] = Field(default_factory=dict)
    subfolder: str | None = None
    tokenizer_subfolder: str | None = None
    devices: str = "0"
    max_batch_size: int = Field(default=1, ge=1)
    default_sampling_params: dict[str, Any] = Field(default_factory=dict)
    inputs_from: str | None = None
    input_processor: str | None = None
    connector: str | None = None
    final_output: bool = False
    #: diffusion stages: multi-GPU DiT / fp8 / compile (diffusion/acceleration.py DitOptions)
    dit_options: dict[str, Any] = Field(default_factory=dict)

    def engine_args_for(self, platform: str) -> dict[str, Any]:
        """`engine_args` with the overlay for `platform` (vLLM's device type, e.g. "cpu", "cuda") merged over it."""
        return {**self.engine_args, **self.platform_engine_args.get(platform, {})}

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: str) -> str:
        parts = [p.strip() for p in v.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"devices must be comma-separated device ids like \"0\" or \"0,1\", got {v!r}")
        return ",".join(parts)

    @field_validator("input_processor")
    @classmethod
    def _processor(cls, v: str | None) -> str | None:
        from ..registry import input_processors

        # input_processor names are registered by the families (Family.input_processor)
        if v is not None and v not in input_processors():
            raise ValueError(f"unknown input_processor {v!r}; known: {', '.join(input_processors())}")
        return v

    @field_validator("connector")
    @classmethod
    def _connector(cls, v: str | None) -> str | None:
        if v is not None and v not in CONNECTORS:
            raise ValueError(f"unknown connector {v!r}; known: {', '.join(CONNECTORS)}")
        return v

    @field_validator("dit_options")
    @classmethod
    def _dit_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        from ..diffusion.acceleration import DitOptions

        DitOptions.from_dict(v)  # raises ValueError naming the bad key or value
        return v

    @model_validator(mode="after")
    def _dit_options_on_diffusion(self) -> "StageSpec":
        if self.dit_options and self.type != "diffusion":
            raise ValueError(f"stage {self.id!r}: dit_options apply to diffusion stages only")
        return self


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    architectures: tuple[str, ...] = Field(min_length=1)
    stages: tuple[StageSpec, ...] = Field(min_length=1)
    #: every stage's dtype unless a stage sets its own (orchestrator/stage_dtype.py); None: the device default
    dtype: Literal["float32", "bfloat16", "float16"] | None = None

    @model_validator(mode="after")
    def _topology(self) -> "StageConfig":
        ids = [s.id for s in self.stages]
        if len(set(ids)) != len(ids):
            raise ValueError(f"stage ids must be unique, got {ids}")
        finals = [s.id for s in self.stages if s.final_output]
        if len(finals) != 1:
            raise ValueError(f"exactly one stage must set final_output: true, got {finals or 'none'}")
        for i, stage in enumerate(self.stages):
            earlier = ids[:i]
            if stage.inputs_from is not None and stage.inputs_from not in earlier:
                raise ValueError(
                    f"stage {stage.id!r}: inputs_from {stage.inputs_from!r} must name an earlier stage "
                    f"({', '.join(earlier) or 'none before it'})"
                )
            if i > 0 and stage.inputs_from is None:
                raise ValueError(f"stage {stage.id!r}: set inputs_from to the stage that feeds it")
        return self

    def stage(self, stage_id: str) -> StageSpec:
        for s in self.stages:
            if s.id == stage_id:
                return s
        raise KeyError(stage_id)

    @property
    def final_stage(self) -> StageSpec:
        return next(s for s in self.stages if s.final_output)


def with_dit_options(config: StageConfig, values: dict[str, Any]) -> StageConfig:
    """`config` with its final (diffusion) stage's `dit_options` replaced by `values`."""
    final = config.final_stage
    merged = final.model_copy(update={"dit_options": dict(values)})
    return config.model_copy(update={"stages": tuple(merged if s.id == final.id else s for s in config.stages)})


def _location(loc: tuple[Any, ...], data: Any) -> str:
    """`stages[1].max_batch_size`, naming a stage by its id where it has one."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            sid = node[part].get("id") if isinstance(node, list) and part < len(node) and isinstance(node[part], dict) else None
            out += f"[{part}]" + (f" (id {sid!r})" if sid else "")
            node = node[part] if isinstance(node, list) and part < len(node) else None
        else:
            out += ("." if out else "") + str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out or "<top level>"


def parse_stage_config(text: str, source: str) -> StageConfig:
    """Parse YAML text; errors name `source`, the field and the fix."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise StageConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise StageConfigError(f"{source}: the top level must be a mapping with name, architectures, stages")
    try:
        return StageConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = _location(err["loc"], data)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                allowed = StageSpec.model_fields if "stages" in err["loc"] else StageConfig.model_fields
                msg = f"unknown field; allowed here: {', '.join(allowed)}"
            elif err["type"] == "missing":
                msg = "required field is missing"
            lines.append(f"  {where}: {msg}")
        raise StageConfigError(f"{source}: invalid stage config\n" + "\n".join(lines)) from e


def load_stage_config(path: str | Path) -> StageConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise StageConfigError(f"{path}: cannot read stage config: {e.strerror}") from e
    return parse_stage_config(text, str(path))


@functools.cache
def builtin_stage_configs() -> dict[str, StageConfig]:
    """The shipped stage configs (each family's, `vllm_omni_plugin.stage_configs.shipped`), by name."""
    from ..stage_configs import shipped

    configs = {}
    for family, path in shipped().items():
        config = parse_stage_config(path.read_text(), f"vllm_omni_plugin/families/{family}/{path.name}")
        configs[config.name] = config
    return configs


def stage_config_for(architectures: list[str] | tuple[str, ...]) -> StageConfig | None:
    """The shipped stage config whose architectures include the checkpoint's, if any."""
    for config in builtin_stage_configs().values():
        if set(config.architectures) & set(architectures):
            return config
    return None
