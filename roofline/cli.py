"""Command line: `roofline generate | chat | kernels | batch | serve | plan | calibrate`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from roofline import __version__, engine_args
from roofline.engine_args import add_engine_args
from roofline.errors import InvalidRequestError, RooflineError

EXIT_USAGE = 2
CHAT_COMMANDS = "/exit to quit, /reset to clear the history"


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sample-seed", dest="sample_seed", type=int, default=None,
                   help="per-request sampling seed (reproducible output)")


# chat-request field -> the argument that sets it; the chat route's limits are the CLI's (max_tokens >= 1)
_SAMPLING_FLAGS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "seed": "sample_seed", "top_logprobs": "logprobs"}


def _sampling(args: argparse.Namespace, **extra):
    """SamplingParams from the flags, held to the limits the server puts on the same request fields."""
    from pydantic import ValidationError

    from roofline.sampling_params import SamplingParams
    from roofline.server.protocol import ChatCompletionRequest

    fields = {name: getattr(args, dest, None) for name, dest in _SAMPLING_FLAGS.items()}
    try:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": ""}], **fields})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        name = err["loc"][0]
        flag = "--" + _SAMPLING_FLAGS[name].replace("_", "-")
        raise InvalidRequestError(f"{flag} {err['msg'].replace('Input should be', 'must be')}, "
                                  f"got {fields[name]}") from None
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sample_seed, **extra)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate one completion and print it (or JSON with --json)."""
    params = _sampling(args, logprobs=args.logprobs)
    from roofline.engine.profiler import check_trace_path, chrome_trace

    trace_path = check_trace_path(args.profile) if args.profile else None  # a bad path fails before the model loads
    llm = engine_args.make_llm(args)
    with chrome_trace(trace_path):
        if args.chat:
            out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
        else:
            out = llm.generate(args.prompt, params)[0]
    if trace_path is not None:
        print(f"roofline: wrote a profiler trace of the generation to {trace_path} (Chrome trace JSON: open it in "
              f"Perfetto or chrome://tracing)", file=sys.stderr)
    completion = out.outputs[0]
    if args.json:
        record = {
            "prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids, "text": completion.text,
            "token_ids": completion.token_ids, "finish_reason": completion.finish_reason,
        }
        if completion.logprobs is not None:
            record["logprobs"] = [
                {str(tid): {"logprob": lp.logprob, "rank": lp.rank, "token": lp.decoded_token}
                 for tid, lp in entry.items()} for entry in completion.logprobs]
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(completion.text)
        if completion.logprobs is not None:
            for tid, entry in zip(completion.token_ids, completion.logprobs):
                alts = ", ".join(f"{lp.decoded_token!r}:{lp.logprob:.3f}" for t, lp in entry.items() if t != tid)
                chosen = entry[tid]
                print(f"  {chosen.decoded_token!r} logprob={chosen.logprob:.4f} rank={chosen.rank}"
                      + (f"  [{alts}]" if alts else ""), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat; tokens stream to the terminal; /exit quits, /reset clears the history."""
    params = _sampling(args)  # bad flags fail before the model loads, not on every turn
    llm = engine_args.make_llm(args)
    engine = llm.engine
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print(f"roofline chat - {CHAT_COMMANDS}", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            del history[1 if args.system else 0:]
            print("(history cleared" + (", system prompt kept)" if args.system else ")"), file=sys.stderr)
            continue
        if command.startswith("//"):  # a line that really begins with "/"
            line = line.replace("//", "/", 1)
        elif command.startswith("/"):  # a mistyped command is not sent to the model
            print(f"unknown command {command.split()[0]}: {CHAT_COMMANDS} (start a line with // to send "
                  f"it beginning with /)", file=sys.stderr)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        prompt = llm.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        rid = f"chat-{turn}"
        turn += 1
        try:
            engine.add_request(rid, ids, params)
        except RooflineError as exc:
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        printed = 0
        text = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    text = out.outputs[0].text
                    sys.stdout.write(text[printed:])
                    sys.stdout.flush()
                    printed = len(text)
        except KeyboardInterrupt:
            engine.abort(rid)
        print()
        history.append({"role": "assistant", "content": text})


def cmd_kernels(args: argparse.Namespace) -> int:
    """Load the model, measure (or read from the cache) its low-bit kernels and print what was chosen."""
    llm = engine_args.make_llm(args)
    report = llm.engine.runner.kernel_report
    if report is None or not report.shapes:
        print(f"no low-bit layers to choose kernels for (quantization {args.quantization}, kernels {args.kernels})")
        return 0
    print(report.format())
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand (only the built-in ones when `command` is one of them)."""
    parser = argparse.ArgumentParser(prog="roofline", description=__doc__)
    parser.add_argument("--version", action="version", version=f"roofline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    add_engine_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--logprobs", type=int, default=None, help="report top-N logprobs per token")
    gen.add_argument("--json", action="store_true", help="print one JSON record")
    gen.add_argument("--profile", default=None, metavar="TRACE.json",
                     help="write a torch profiler trace (Chrome trace JSON) of the generation to this file")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with streamed replies")
    add_engine_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=cmd_chat)

    kern = sub.add_parser("kernels", help="show the matmul kernels measured and chosen on this machine")
    add_engine_args(kern)
    kern.set_defaults(func=cmd_kernels)

    if command not in _BUILTIN_COMMANDS:  # their imports (FastAPI, the server, the planner) cost ~0.3 s
        for register in _optional_commands():
            register(sub)
    return parser


_BUILTIN_COMMANDS = ("generate", "chat", "kernels")


def _command_of(argv: list[str]) -> str | None:
    """The subcommand argv names: its first word that is not an option (top-level options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _optional_commands():
    """Subcommands that live in their own packages (imported only when one of them may run)."""
    from roofline.batch import add_batch_parser
    from roofline.planner.commands import add_calibrate_parser, add_plan_parser
    from roofline.server.commands import add_serve_parser

    return [add_plan_parser, add_calibrate_parser, add_batch_parser, add_serve_parser]


def _pause_gc_for_start_up(args: argparse.Namespace) -> None:
    """Turn the cyclic collector off until the model is loaded, for commands that load one at once (not with
    --compile: tracing makes cyclic garbage for minutes). See engine_args.pause_gc."""
    loads = args.command in _BUILTIN_COMMANDS or (args.command == "serve" and getattr(args, "backend", "local")
                                                  == "local" and getattr(args, "data_parallel_size", 1) == 1)
    if loads and not getattr(args, "compile", False):
        engine_args.pause_gc()


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors print one line and exit 2."""
    parser = build_parser(_command_of(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    bad = next((name for name, value in vars(args).items() if isinstance(value, str) and not _is_utf8(value)), None)
    if bad is not None:  # argv bytes that are not UTF-8 arrive as lone surrogates, which no tokenizer takes
        print(f"roofline: error: --{bad.replace('_', '-')} is not valid UTF-8 text", file=sys.stderr)
        return EXIT_USAGE
    if argv is None:  # only as the process's entry point: in a caller's process, freezing would keep its garbage
        _pause_gc_for_start_up(args)
    try:
        return args.func(args)
    except RooflineError as exc:
        print(f"roofline: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        engine_args.resume_gc()  # a command that failed before its model loaded


if __name__ == "__main__":
    sys.exit(main())
