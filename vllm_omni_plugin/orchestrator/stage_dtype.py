"""One dtype rule for every stage of a multi-stage model (AR stage in vLLM, DiT stage in the diffusion engine).

Highest first, for each stage:

  1. the stage's own explicit value: `Omni(ar_engine_args={"dtype": ...})` for the AR stage;
  2. the model-wide explicit value: `Omni(dtype=...)`, `vllm serve --dtype ...`;
  3. the stage's value in the stage config (the AR stage's `engine_args.dtype`);
  4. the stage config's model-wide `dtype:`;
  5. the device default, the same for every stage: float32 on CPU, bfloat16 on GPUs.

Why float32 on CPU (docs/server.md, "dtype"): it is the dtype diffusers' and
transformers' reference pipelines run in on CPU, so `Omni` equals them there
(GLM-Image with the AR stage in the checkpoint's bfloat16 and the DiT in float32
differed from diffusers by a mean 3.5-5 levels); and without AMX or AVX512-BF16,
bfloat16 is emulated and slower on a CPU (measured in benchmarks/bench_cpu_dtype.py).
On AMX CPUs bfloat16 is faster; pass `--dtype bfloat16` / `Omni(dtype="bfloat16")`
to get it for every stage.
"""

from __future__ import annotations

from typing import Any

_ALIASES = {"float": "float32", "half": "float16", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(dtype: Any) -> str | None:
    """"float32" / "bfloat16" / ... for a torch dtype or a vLLM dtype string; None for None and "auto"."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    return None if name == "auto" else _ALIASES.get(name, name)


def device_default_dtype(device_type: str) -> str:
    """The dtype every stage runs in on `device_type` ("cpu", "cuda", ...) when nothing says otherwise."""
    return "float32" if device_type == "cpu" else "bfloat16"


def model_dtype(explicit: Any, config_dtype: str | None, device_type: str) -> str:
    """The model-wide dtype: explicit (Omni dtype= / --dtype) > the stage config's `dtype:` > the device default."""
    return dtype_name(explicit) or dtype_name(config_dtype) or device_default_dtype(device_type)


def ar_dtype(explicit_stage: Any, explicit_model: Any, config_stage: Any, config_dtype: str | None,
             device_type: str) -> str:
    """The AR stage's dtype by the rule above (rows 1-5); "auto" in the stage config means the checkpoint's."""
    for value in (explicit_stage, explicit_model):
        if (name := dtype_name(value)) is not None:
            return name
    if config_stage is not None:
        return str(config_stage)
    return model_dtype(None, config_dtype, device_type)
