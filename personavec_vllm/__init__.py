"""Persona vectors for a stock vLLM server: per-request steering, live trait monitoring,
and data screening. See README.md."""

__version__ = "0.1.0"

# The key under which a request's persona spec travels in vLLM's SamplingParams.extra_args.
EXTRA_ARGS_KEY = "personavec"
# Where the front end puts the validated, default-resolved spec that the worker reads.
RESOLVED_KEY = "personavec_resolved"
