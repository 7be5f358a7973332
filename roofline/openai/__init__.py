"""The OpenAI API without a transport: requests -> engine work (prompts, SamplingParams, structured outputs,
tools) -> response bodies and stream chunks. The HTTP server (roofline/server/) and `roofline batch` both run
it; nothing here imports the HTTP stack."""
