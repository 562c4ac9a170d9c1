"""vLLM general plugin (group `vllm.general_plugins`): runs in every vLLM process."""


def register() -> None:
    return None
