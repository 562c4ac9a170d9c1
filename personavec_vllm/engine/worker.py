"""Worker side: hooks on vLLM's model runner that keep the steering tables in step with the batch.

Nothing in the forward pass says which token belongs to which request; the runner knows. Per
step, after `_prepare_inputs` has laid out the batch, we map each token of a persona request
to its table row (by its position: prompt / last prompt token / generated) and switch on the
layers that have work. Monitoring is summed on the device (the op adds each monitored token's
projection to its request's accumulator rows); when a request leaves the engine, its sums are
copied to the host once and pushed to the front end. Only requests that asked for per-token
values (and the offline API) have their projections read back after every `_model_forward`.

Hooked (listed and checked at start-up in `_compat`): `GPUModelRunner.load_model`,
`_update_states`, `_prepare_inputs`, `_model_forward` (the CPU runner inherits the last three).

A failure that concerns one request (its spec is malformed, its vector version is gone, the
tables are full) fails that request only: it runs as a plain request, and the worker reports
the failure to the front end that took it, which aborts it and answers with an error. The
engine keeps stepping.
"""

from __future__ import annotations

import functools
import logging

from personavec_vllm import config
from personavec_vllm.config import REPLY_TO_KEY, RESOLVED_KEY
from personavec_vllm.engine import _compat, op
from personavec_vllm.engine.tables import ActiveRequest, SteeringTables, TokenSpan
from personavec_vllm.engine.transport import Message, ResultRouter
from personavec_vllm.library import VectorLibrary
from personavec_vllm.spec import PersonaSpec

logger = logging.getLogger(__name__)


def _extra_args(request_state) -> dict:
    params = getattr(request_state, "sampling_params", None)
    return getattr(params, "extra_args", None) or {}


def _spec_of(extra: dict) -> PersonaSpec | None:
    resolved = extra.get(RESOLVED_KEY)
    if resolved is None:
        return None
    spec = PersonaSpec.from_dict(resolved)
    fault = config.get(config.FAULT_VECTOR)  # fault injection, for tests
    if fault and fault in {t.vector for t in spec.steer} | {t.vector for t in spec.monitor}:
        raise RuntimeError(f"fault injected for vector {fault!r} ({config.FAULT_VECTOR})")
    return spec


def _request_key(extra: dict, req_id: str) -> str:
    resolved = extra.get(RESOLVED_KEY)
    key = resolved.get("request_key") if isinstance(resolved, dict) else None
    return key if isinstance(key, str) and key else req_id


class StepPlan:
    """What the current step's forward must do for persona requests, and what to report."""

    __slots__ = ("deciding", "monitors", "num_tokens", "report")
    # `monitors`: requests with per-token values; summed ones need nothing after the forward

    def __init__(
        self,
        num_tokens: int,
        monitors: list[tuple[ActiveRequest, TokenSpan]],
        report: Message,
        deciding: list[ActiveRequest],
    ):
        self.num_tokens = num_tokens
        self.monitors = monitors  # monitored requests whose span reaches their last prompt token
        self.report = report  # admissions and failures of this step
        self.deciding = deciding  # gated requests whose gates are decided in this forward


def _build_tables(runner) -> SteeringTables | None:
    _compat.check_input_batch(getattr(runner, "input_batch", None))
    if not config.steering_on():
        logger.info("personavec: %s=off: no steering op in the model, no tables", config.STEERING)
        return None
    model = runner.get_model()
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not any(hasattr(layer, "personavec_layer") for layer in layers):
        logger.warning(
            "personavec: %s is not a steerable architecture (set PERSONAVEC_ARCHITECTURES); "
            "persona steering and monitoring are off",
            type(model).__name__,
        )
        return None
    hf_config = runner.model_config.hf_text_config
    library = VectorLibrary(config.get(config.VECTORS), len(layers), hf_config.hidden_size)
    tables = SteeringTables(
        library,
        max_tokens=runner.max_num_tokens,
        max_slots=2 * runner.max_num_reqs,
        # The live library is capped at PERSONAVEC_MAX_LIBRARY (in the front end); twice as many
        # columns leave room for the older versions that running requests still hold.
        max_columns=2 * config.get_int(config.MAX_LIBRARY),
        device=runner.device,
        dtype=runner.model_config.dtype,
    )
    logger.info(
        "personavec: steering tables ready (%d layers, %d vectors loaded from %s)",
        len(layers),
        len(library),
        library.directory,
    )
    return tables


def _publisher() -> ResultRouter | None:
    """Tensor-parallel rank 0 reports projections (every rank holds the same replicated hidden
    states and tables); the others send nothing."""
    from vllm.distributed import get_tensor_model_parallel_rank

    return ResultRouter() if get_tensor_model_parallel_rank() == 0 else None


def _admit(runner, tables: SteeringTables, req_id: str, batch_ids: set[str], report: Message):
    """Admit one request to the tables; a failure fails that request alone (reported)."""
    extra = _extra_args(runner.requests[req_id])
    publisher = getattr(runner, "_personavec_publisher", None)
    key = _request_key(extra, req_id)
    if publisher is not None and RESOLVED_KEY in extra:
        publisher.route(key, extra.get(REPLY_TO_KEY))
    try:
        state = tables.admit(req_id, _spec_of(extra), batch_ids)
    except Exception as exc:
        _fail(runner, tables, req_id, report, str(exc))
        return None
    if state is not None:
        report.admitted.append(key)
    return state


def _fail(runner, tables: SteeringTables, req_id: str, report: Message, reason: str) -> None:
    """The request runs plain from now on, until the front end that took it aborts it."""
    logger.error("personavec: request %s cannot be steered or monitored: %s", req_id, reason)
    tables.release(req_id)
    tables.requests[req_id] = None
    key = _request_key(_extra_args(runner.requests[req_id]), req_id)
    report.failed.append((key, req_id, f"personavec: the worker could not serve this request: {reason}"))


def _lost_sums(state: ActiveRequest, span: TokenSpan) -> bool:
    """A summed request admitted past its last prompt token: it was reclaimed while preempted
    (its sums with it) and resumes from the prefix cache, so earlier positions will not come again."""
    return state.acc_slot is not None and span.first > span.num_prompt - 1


def plan_step(runner, num_scheduled_tokens) -> StepPlan | None:
    tables = op.TABLES
    if tables is None:
        return None
    batch = runner.input_batch
    req_ids = batch.req_ids[: batch.num_reqs]
    spans: list[tuple[TokenSpan, int]] = []
    summed: list[tuple[TokenSpan, ActiveRequest]] = []
    monitors: list[tuple[ActiveRequest, TokenSpan]] = []
    steer_layers: set[int] = set()
    cap_layers: set[int] = set()
    gated_layers: set[int] = set()
    gate_layers: set[int] = set()
    capture_layers: set[int] = set()
    gate_tokens: list[tuple[int, int]] = []
    deciding: list[ActiveRequest] = []
    report = Message()
    batch_ids = None
    start = 0
    for i, req_id in enumerate(req_ids):
        count = int(num_scheduled_tokens[i])
        new = req_id not in tables.requests
        if new:
            batch_ids = batch_ids or set(req_ids)
            state = _admit(runner, tables, req_id, batch_ids, report)
        else:
            state = tables.requests[req_id]
        if state is not None:
            span = TokenSpan(start, count, int(batch.num_computed_tokens_cpu[i]), int(batch.num_prompt_tokens[i]))
            if new and _lost_sums(state, span):
                _fail(runner, tables, req_id, report, "its projections were lost when it was preempted; retry it")
                start += count
                continue
            if state.slot is not None:
                spans.append((span, state.slot))
                steer_layers |= state.steer_layers
                cap_layers |= state.cap_layers
                gated_layers |= state.gated_layers
                if state.gates and span.reaches_last_prompt_token and span.first < span.num_prompt:
                    gate_tokens.append((state.slot, span.start + span.num_prompt - 1 - span.first))
                    gate_layers.update(g.layer for g in state.gates)
                    deciding.append(state)
            if state.monitor and span.reaches_last_prompt_token:
                if state.acc_slot is not None:
                    summed.append((span, state))
                else:
                    monitors.append((state, span))
                capture_layers.update(layer for _, layer, _ in state.monitor)
        start += count
    tables.set_token_rows(spans, start)
    tables.set_acc_rows(summed, start)
    tables.set_gate_tokens(gate_tokens)
    tables.set_active_layers(steer_layers, capture_layers, cap_layers, gated_layers, gate_layers)
    return StepPlan(start, monitors, report, deciding) if monitors or report or deciding else None


def read_projections(tables: SteeringTables, plan: StepPlan) -> Message:
    """The step's report: its admissions and failures, and the projections of monitored requests."""
    message = plan.report
    for state in plan.deciding:  # a small device-to-host copy, once per gated request
        assert state.slot is not None
        message.gates.append((state.spec.request_key, tables.gate_values(state.slot, len(state.gates))))
    if not plan.monitors:
        return message
    layers = sorted({layer for state, _ in plan.monitors for _, layer, _ in state.monitor})
    index = {layer: i for i, layer in enumerate(layers)}
    proj = tables.proj[layers, : plan.num_tokens].cpu().numpy()  # one device->host copy
    before = None
    if any(state.steer_layers or state.cap_layers for state, _ in plan.monitors):
        before = tables.proj_before[layers, : plan.num_tokens].cpu().numpy()
    for state, span in plan.monitors:
        lo = max(span.first, span.num_prompt - 1)  # first response position in this span
        tokens = slice(span.start + lo - span.first, span.start + span.count)
        steered = state.steer_layers | state.cap_layers
        series: dict[tuple[str, int], list[float]] = {}
        for vector, layer, col in state.monitor:
            series[(vector, layer)] = proj[index[layer], tokens, col].tolist()
            if before is not None and layer in steered:  # also what the model had before our terms
                series[(vector, -layer)] = before[index[layer], tokens, col].tolist()
        message.values.append((state.spec.request_key, lo - (span.num_prompt - 1), series))
    return message


def install_runner_hooks() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_personavec_hooked", False):
        return
    runner_classes = [GPUModelRunner]
    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        # The CPU runner overrides load_model (without calling super); the rest it inherits.
        _compat.check_cpu_runner()
        runner_classes.append(CPUModelRunner)

    def wrap_load(orig):
        @functools.wraps(orig)
        def load_model(self, *args, **kwargs):
            result = orig(self, *args, **kwargs)
            op.TABLES = _build_tables(self)
            self._personavec_publisher = _publisher()
            self._personavec_plan = None
            return result

        return load_model

    orig_update = GPUModelRunner._update_states
    orig_prepare = GPUModelRunner._prepare_inputs
    orig_forward = GPUModelRunner._model_forward

    @functools.wraps(orig_update)
    def _update_states(self, scheduler_output):
        tables = op.TABLES
        if tables is not None and scheduler_output.finished_req_ids:
            done, sums = [], []
            for req_id in scheduler_output.finished_req_ids:
                known = req_id in tables.requests
                state = tables.requests.get(req_id)
                if state is not None and state.acc_slot is not None:  # its monitoring, copied once
                    sums.append((state.spec.request_key, tables.read_sums(state)))
                state = tables.release(req_id)
                if state is not None:
                    done.append(state.spec.request_key)
                elif known:  # plain, or failed: the front end may still wait on a failed one
                    key = _request_key(_extra_args(self.requests.get(req_id)), req_id)
                    done.append(key)
            if done and self._personavec_publisher is not None:
                self._personavec_publisher.send(Message(done=done, sums=sums))
        return orig_update(self, scheduler_output)

    @functools.wraps(orig_prepare)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = orig_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        self._personavec_plan = plan_step(self, num_scheduled_tokens)
        return result

    @functools.wraps(orig_forward)
    def _model_forward(self, *args, **kwargs):
        output = orig_forward(self, *args, **kwargs)
        tables, plan = op.TABLES, getattr(self, "_personavec_plan", None)
        if tables is not None:
            if plan is not None and self._personavec_publisher is not None:
                self._personavec_publisher.send(read_projections(tables, plan))
            self._personavec_plan = None
            tables.set_active_layers(set(), set())
        return output

    for cls in runner_classes:
        if "load_model" in cls.__dict__:
            cls.load_model = wrap_load(cls.load_model)  # type: ignore[method-assign]
    GPUModelRunner._update_states = _update_states  # type: ignore[method-assign]
    GPUModelRunner._prepare_inputs = _prepare_inputs  # type: ignore[method-assign]
    GPUModelRunner._model_forward = _model_forward  # type: ignore[method-assign]
    GPUModelRunner._personavec_hooked = True  # type: ignore[attr-defined]
