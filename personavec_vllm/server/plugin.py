"""vLLM endpoint plugin (group `vllm.endpoint_plugins`): attaches persona routes to the
OpenAI server. Routes and request fields are filled in by the server layer."""


class PersonaEndpoints:
    name = "personavec"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:  # noqa: D401 - vLLM interface
        return None

    async def init_state(self, engine_client, state, args) -> None:
        return None
