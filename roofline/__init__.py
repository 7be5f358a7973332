"""roofline: serve open LLMs close to the hardware's roofline, and explain why."""

from roofline.errors import RooflineError
from roofline.llm import LLM
from roofline.outputs import CompletionOutput, Logprob, RequestOutput
from roofline.sampling_params import SamplingParams, StructuredSpec

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredSpec", "RequestOutput", "CompletionOutput", "Logprob", "RooflineError"]
