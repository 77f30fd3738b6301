"""Samplers by the names people know them by (AUTOMATIC1111 / ComfyUI), as diffusers schedulers.

Each name maps to a scheduler class and the options that make it that sampler; the new
scheduler is built `from_config` of the model's own, so its training schedule is kept.
Flow-matching models (SD3, FLUX) take only flow-matching samplers, and the others none.
"""

from __future__ import annotations

from .settings import SettingsError

SCHEDULERS = {
    "DDIM": ("DDIMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "Flow Euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
FLOW_SCHEDULERS = ("Flow Euler",)


def scheduler_names(family: str | None = None) -> list[str]:
    if family is None:
        return list(SCHEDULERS)
    flow = family in ("sd3", "flux")
    return [n for n in SCHEDULERS if (n in FLOW_SCHEDULERS) == flow]


def check_scheduler(name: str, family: str) -> None:
    if name not in SCHEDULERS:
        raise SettingsError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    if name not in scheduler_names(family):
        kind = "flow-matching" if family in ("sd3", "flux") else "noise-prediction"
        raise SettingsError(
            f"{name} does not work with {family} ({kind}) models; choose one of: {', '.join(scheduler_names(family))}"
        )


def make_scheduler(name: str, family: str, base_config, *, shift: float | None = None):
    import diffusers

    check_scheduler(name, family)
    cls_name, options = SCHEDULERS[name]
    options = dict(options)
    if shift is not None:
        options["shift"] = shift
    return getattr(diffusers, cls_name).from_config(base_config, **options)
