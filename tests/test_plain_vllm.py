"""Installing personavec must not change what plain vLLM does (issue #12, item 10).

On CUDA, vLLM 0.32 runs dense models on its V2 model runner, which personavec does not hook. The
plugin used to raise in every `InputProcessor.__init__` there, so that no vLLM engine in the
environment could start. Now plain requests are served as usual and only persona requests are
refused, naming the fix. The CPU build cannot configure V2 (it needs Triton), so the check builds
a real engine config, then switches V2 on the way a CUDA default does (vLLM reads the setting when
asked), and drives a real `InputProcessor` with the plugin loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
import os, sys
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.input_processor import InputProcessor
from personavec_vllm.engine.offline import persona_params

mode = sys.argv[2]
config = EngineArgs(
    model=sys.argv[1], dtype="float32", max_model_len=256, pipeline_parallel_size=2 if mode == "pp" else 1
).create_engine_config()
if mode == "v2":
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    assert config.use_v2_model_runner
from vllm import ModelRegistry
print("LLAMA", ModelRegistry.models["LlamaForCausalLM"].module_name)
processor = InputProcessor(config)
request = processor.process_inputs("plain", "hello there", SamplingParams(max_tokens=2), supported_tasks=("generate",))
print("PLAIN", request.request_id, list(request.sampling_params.extra_args or {}))
try:
    processor.process_inputs("persona", "hello", persona_params(SamplingParams(max_tokens=2), monitor=True),
                             supported_tasks=("generate",))
except VLLMValidationError as exc:
    print("REFUSED", exc)
"""


def _run_script(model, mode: str, cwd, **settings: str) -> subprocess.CompletedProcess:
    """SCRIPT in a fresh process with the plugin and `settings` in its environment."""
    env = {**os.environ, "VLLM_PLUGINS": "personavec", **settings}
    env.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=cwd,
    )


def _drive_input_processor(model, mode: str, cwd, **settings: str) -> tuple[str, str]:
    """The REFUSED line of SCRIPT in `mode` (or "" if nothing was refused), after checking that
    the plain request passed, and the module of the Llama model class vLLM would build."""
    out = _run_script(model, mode, cwd, **settings)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "PLAIN plain []" in lines, out.stdout
    refused = next((line for line in lines if line.startswith("REFUSED")), "")
    model_module = next(line for line in lines if line.startswith("LLAMA")).split()[1]
    return refused, model_module


def test_v2_model_runner_serves_plain_requests_and_refuses_persona(tiny_llama, tmp_path):
    refused, _ = _drive_input_processor(tiny_llama, "v2", tmp_path)
    assert "V2" in refused and "VLLM_USE_V2_MODEL_RUNNER=0" in refused


def test_pipeline_parallel_refuses_persona_requests(tiny_llama, tmp_path):
    """Each pipeline stage would steer and report only its own layers, and each stage's rank 0
    would end the request's report: persona requests are refused, plain ones pass."""
    refused, _ = _drive_input_processor(tiny_llama, "pp", tmp_path)
    assert "pipeline parallelism" in refused and "--tensor-parallel-size" in refused


@pytest.mark.parametrize("steering", ["on", "off"])
def test_steering_off_builds_stock_models_and_refuses_persona_requests(tiny_llama, tmp_path, steering):
    """PERSONAVEC_STEERING=off (benchmark scenario 2n: what the op costs when unused) must leave
    vLLM's own model class, so the compiled graph has no op, and refuse persona requests naming
    the setting; with "on" (the default) the model class is ours and the same request gets as far
    as its spec's validation."""
    refused, model_module = _drive_input_processor(tiny_llama, "plain", tmp_path, PERSONAVEC_STEERING=steering)
    if steering == "off":
        assert model_module.startswith("vllm.model_executor.models"), model_module
        assert "PERSONAVEC_STEERING=off" in refused, refused
    else:
        assert model_module == "personavec_vllm.engine.architectures"
        # past the steering check, into the spec's own validation (this engine has no vectors)
        assert "no vectors are loaded to monitor" in refused and "PERSONAVEC_STEERING" not in refused


def test_a_misspelt_steering_setting_stops_the_start(tiny_llama, tmp_path):
    out = _run_script(tiny_llama, "plain", tmp_path, PERSONAVEC_STEERING="of")
    assert out.returncode != 0
    assert "PERSONAVEC_STEERING must be on or off, got 'of'" in out.stderr
