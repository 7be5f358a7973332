"""The OpenAI translation is shared and transport-free: `roofline batch` and the server run the same code, the
batch side never imports the HTTP stack, and no module reaches into another's private names."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import roofline

PACKAGE = pathlib.Path(roofline.__file__).parent


def test_the_translation_and_batch_import_no_http_stack():
    code = ("import sys, roofline.batch, roofline.openai.chat, roofline.openai.completions, roofline.engine_args; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("roofline"):
                offenders += [f"{path.relative_to(PACKAGE)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert offenders == []


def test_the_server_routes_and_batch_build_on_the_same_functions():
    from roofline import batch
    from roofline.openai import chat, completions
    from roofline.server import chat as chat_route, completions as completion_route

    assert batch.plan_chat is chat.plan_chat and chat_route.plan_task is chat.plan_chat
    assert batch.plan_completion is completions.plan_completion
    assert completion_route.plan_task is completions.plan_completion
    assert batch.chat_response is chat.chat_response and chat_route.response_body is chat.chat_response
    assert batch.completion_response is completions.completion_response
    assert completion_route.response_body is completions.completion_response


def test_every_subcommand_registers():
    from roofline.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"generate", "chat", "kernels", "batch", "serve", "plan", "calibrate"} <= set(commands)
