"""roofline: serve open LLMs close to the hardware's roofline, and explain why."""

from roofline.errors import RooflineError
from roofline.outputs import CompletionOutput, Logprob, RequestOutput
from roofline.sampling_params import SamplingParams, StructuredSpec

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredSpec", "RequestOutput", "CompletionOutput", "Logprob", "RooflineError"]


def __getattr__(name: str):
    # LLM on first use: it imports torch and the engine (~1.5 s), which `roofline --help`, `roofline plan` and
    # the CLI's own start-up (before it turns the collector off for the load) need not pay
    if name == "LLM":
        from roofline.llm import LLM

        return LLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
