"""vLLM general plugin (entry point group `vllm.general_plugins`).

vLLM calls `register()` in every process it starts (front end, engine core, workers) before
the model is built. It checks the vLLM internals we hook (`_compat`) and installs, in order of a
request's path: the front-end hook, the steered model classes, the custom op, the worker hooks.
With `PERSONAVEC_STEERING=off` the model classes stay vLLM's own (no op in the model).
"""

from __future__ import annotations


def register() -> None:
    from personavec_vllm import config
    from personavec_vllm.engine import _compat

    _compat.check()
    from personavec_vllm.engine.architectures import register_architectures
    from personavec_vllm.engine.frontend import install_frontend_hooks
    from personavec_vllm.engine.op import register_op
    from personavec_vllm.engine.worker import install_runner_hooks

    install_frontend_hooks()
    if config.steering_on():
        register_architectures()
    register_op()
    install_runner_hooks()
