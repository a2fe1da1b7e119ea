"""What the plugin looks like from inside one process: `vllm-omni doctor`.

`collect()` only reads state, so it answers the same question from a shell
(after running the plugin's `register()` the way vLLM would) and from inside a
running engine or worker (e.g. through `LLM.collective_rpc`).
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field


@dataclass
class Report:
    pid: int
    plugin_version: str
    vllm_version: str
    vllm_platform: str
    python: str
    entry_point: str
    patches: list[dict] = field(default_factory=list)
    architectures: list[dict] = field(default_factory=list)
    #: the dtype every stage runs in here unless told otherwise (orchestrator/stage_dtype.py)
    default_dtype: str = ""
    #: CPU platform: each CPU attention kernel and the KV layout it writes here (kv/cpu_isa.py)
    cpu_attention: list[dict] = field(default_factory=list)
    #: vLLM version -> what was verified on it (contracts.VERIFIED)
    verified: dict[str, str] = field(default_factory=dict)
    #: `--contracts`: contracts.report() against the installed vLLM (None when not asked for)
    contracts: dict | None = None

    @property
    def ok(self) -> bool:
        return all(p["status"] in ("applied", "already applied", "not applicable") for p in self.patches) and all(
            a["registered"] for a in self.architectures
        ) and (self.contracts is None or self.contracts["ok"])

    def as_text(self) -> str:
        lines = [
            f"vllm-omni-plugin {self.plugin_version} (pid {self.pid}, Python {self.python})",
            f"vLLM {self.vllm_version}, platform {self.vllm_platform}",
            f"entry point: {self.entry_point}",
            "patches:",
        ]
        width = max((len(p["name"]) for p in self.patches), default=0)
        for p in self.patches:
            detail = f" -- {p['detail']}" if p["detail"] else ""
            lines.append(f"  {p['name']:<{width}}  {p['status']:<16} {p['target']}{detail}")
        lines.append("architectures:")
        for a in self.architectures:
            state = "registered" if a["registered"] else "NOT registered"
            lines.append(f"  {a['architecture']:<36} {state:<15} {a['target']}")
        lines.append(f"default dtype of every stage on this platform: {self.default_dtype}")
        if self.cpu_attention:
            lines.append("CPU attention kernels (KV layout as written through vLLM's kernel here):")
            for k in self.cpu_attention:
                lines.append(f"  {k['isa']:<6} {k['state']}")
        lines.append("verified per vLLM version:")
        for version, what in self.verified.items():
            lines.append(f"  {version:<8} {'(installed) ' if version == self.vllm_version else ''}{what}")
        if self.vllm_version not in self.verified:
            lines.append(f"  {self.vllm_version:<8} (installed) nothing verified on it: run `vllm-omni doctor --contracts`")
        if self.contracts is not None:
            c = self.contracts
            lines.append(f"contracts with vLLM {c['vllm']} ({c['vllm_path']}): {c['checked']} checked, "
                         f"{c['by_import']} by import, {c['by_source']} from source: {'ok' if c['ok'] else 'BROKEN'}")
            for item in c["contracts"]:
                if not item["ok"]:
                    lines.append(f"  BROKEN {item['kind']:<10} {item['name']} -- {item['detail']}")
        lines.append("status: " + ("ok" if self.ok else "PROBLEMS (see above)"))
        return "\n".join(lines)


def _entry_point() -> str:
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value.startswith("vllm_omni_plugin")]
    return ", ".join(f"{ep.name} -> {ep.value}" for ep in found) or "NOT FOUND (is the package installed?)"


def _cpu_attention() -> list[dict]:
    """Each vLLM CPU attention kernel: the layout it writes here, or why it cannot run here."""
    import torch

    from vllm_omni_plugin.kv.cpu_isa import cpu_flags, cpu_lacks, cpu_layout

    out = []
    for isa in ("vec", "vec16", "amx", "neon", "vxe", "vsx", "rvv"):
        dtype = torch.bfloat16 if isa in ("amx", "neon") else torch.float32
        head_dim, block_size = (80, 16) if isa == "vec16" else (64, 32)
        if (reason := cpu_lacks(isa)) is not None:
            state = f"not on this CPU: {reason}"
        elif (layout := cpu_layout(isa, dtype, head_dim, block_size)) is not None:
            state = f"layout {layout} ({str(dtype).removeprefix('torch.')})"
        else:
            state = "no known layout, or not in this vLLM build (omni engines use vec/vec16)"
        out.append({"isa": isa, "state": state})
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "bf16"})
    out.append({"isa": "flags", "state": " ".join(flags) or "-"})
    return out


def collect(contracts: bool = False) -> Report:
    """This process's view of the plugin; with `contracts`, the contract checks against the installed vLLM."""
    import vllm
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    import vllm_omni_plugin
    from vllm_omni_plugin.contracts import VERIFIED, check_contracts, report
    from vllm_omni_plugin.model_registry import OMNI_MODELS
    from vllm_omni_plugin.orchestrator.stage_dtype import device_default_dtype
    from vllm_omni_plugin.patches import status

    supported = set(ModelRegistry.get_supported_archs())
    return Report(
        pid=os.getpid(),
        plugin_version=vllm_omni_plugin.__version__,
        vllm_version=vllm.__version__,
        vllm_platform=f"{type(current_platform).__name__} ({current_platform.device_type})",
        python=platform.python_version(),
        entry_point=_entry_point(),
        patches=[asdict(r) for r in status()],
        architectures=[
            {"architecture": m.architecture, "target": m.target, "registered": m.architecture in supported}
            for m in OMNI_MODELS
        ],
        default_dtype=device_default_dtype(current_platform.device_type),
        cpu_attention=_cpu_attention() if current_platform.device_type == "cpu" else [],
        verified=dict(VERIFIED),
        contracts=report(check_contracts()) if contracts else None,
    )
