"""`serve --data-parallel-size`: the flags each replica gets, the thread split, and user errors before any launch."""

from __future__ import annotations

from roofline.cli import build_parser, main
from roofline.parallel.serve import replica_serve_args, serve_parser, threads_per_replica


def test_replicas_get_the_engine_flags_but_not_the_front_end_ones():
    argv = ["serve", "--model", "m.gguf", "--data-parallel-size", "2", "--host", "0.0.0.0", "--port", "9000",
            "--api-key", "k", "--threads", "3", "--max-num-seqs", "8", "--max-decode-stall-ms", "none",
            "--kv-cache-memory", "16MiB", "--enforce-eager", "--access-log"]
    args = build_parser().parse_args(argv)
    forwarded = replica_serve_args(args, serve_parser())
    assert forwarded[forwarded.index("--model") + 1] == "m.gguf"
    assert forwarded[forwarded.index("--max-num-seqs") + 1] == "8"
    assert forwarded[forwarded.index("--max-decode-stall-ms") + 1] == "none"
    assert "--enforce-eager" in forwarded
    for owned in ("--host", "--port", "--api-key", "--threads", "--data-parallel-size", "--access-log"):
        assert owned not in forwarded
    assert "--dtype" not in forwarded  # defaults are left to the replica
    reparsed = build_parser().parse_args(["serve", *forwarded])  # what a replica parses back is the same
    assert (reparsed.kv_cache_memory, reparsed.max_decode_stall_ms) == (16 << 20, None)


def test_threads_split_the_cores_and_never_reach_zero():
    assert threads_per_replica(2, 5) == 5  # --threads is per replica
    assert threads_per_replica(10_000, None) == 1


def test_bad_values_fail_in_one_line_before_any_replica_starts(capsys):
    assert main(["serve", "--data-parallel-size", "2", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("roofline: error: model '/no/such/model' not found") and "\n" not in err
    try:
        build_parser().parse_args(["serve", "--data-parallel-size", "0"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--data-parallel-size 0 was accepted")
    assert "must be >= 1" in capsys.readouterr().err


def test_connections_to_the_listening_socket_get_tcp_nodelay():
    """asyncio sets TCP_NODELAY only for an IPPROTO_TCP socket; without it each kept-alive answer waited ~40 ms."""
    import asyncio
    import socket

    from roofline.server.commands import bind_port

    sock = bind_port("127.0.0.1", 0)
    sock.listen()

    async def scenario() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        try:
            return await asyncio.wait_for(accepted, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(scenario()) != 0


def test_ray_flags_without_the_ray_backend_or_with_data_parallel_are_one_line_errors(capsys):
    assert main(["serve", "--num-replicas", "2", "--model", "default"]) == 2
    assert "need --backend ray" in capsys.readouterr().err
    assert main(["serve", "--backend", "ray", "--data-parallel-size", "2", "--model", "default"]) == 2
    assert "not --data-parallel-size" in capsys.readouterr().err
    assert main(["serve", "--backend", "ray", "--num-replicas", "2", "--autoscale", "0,2"]) == 2
    assert "not both" in capsys.readouterr().err


def test_ray_options_map_the_flags_onto_ray_serve():
    from roofline.parallel.ray_app import ray_options

    fixed = ray_options(build_parser().parse_args(["serve", "--backend", "ray", "--num-replicas", "3"]))
    assert fixed.deployment_options()["num_replicas"] == 3
    scaled = ray_options(build_parser().parse_args(["serve", "--backend", "ray", "--autoscale", "0,4",
                                                    "--idle-timeout", "30", "--threads", "2"]))
    config = scaled.deployment_options()["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"], config["initial_replicas"]) == (0, 4, 1)
    assert config["downscale_to_zero_delay_s"] == 30 and scaled.num_cpus == 2
