"""vLLM general plugin (entry point group `vllm.general_plugins`).

vLLM calls `register()` in every process it starts (front end, engine core, workers) before
the model is built. We pin the vLLM minor version whose internals we hook and fail loudly if
they moved, rather than serve requests whose steering would be silently dropped.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = "0.32."


def check_vllm_version() -> None:
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"personavec-vllm supports vllm {SUPPORTED_VLLM}*, found {vllm.__version__}; "
            "install a matching personavec-vllm release"
        )


def register() -> None:
    check_vllm_version()
    from personavec_vllm.steering.architectures import register_architectures
    from personavec_vllm.steering.frontend import install_frontend_hooks
    from personavec_vllm.steering.op import register_op
    from personavec_vllm.steering.runner import install_runner_hooks

    register_op()
    register_architectures()
    install_runner_hooks()
    install_frontend_hooks()
