"""The streaming executor: weights on host, on disk and split give the fully resident run's tokens and logprobs."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from roofline import LLM, SamplingParams
from roofline.offload import Tier

NUM_LAYERS = 4
FAMILIES = {"llama": "llama-mha-bias-linear-rope", "qwen3": "qwen3-qknorm-5heads-bias-untied"}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [100, 7, 300, 250, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
                                                  24, 25]]
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, logprobs=2)
PLACEMENTS = {"host": "w=0/100/0", "disk": "w=0/0/100", "split": "w=25/25/50"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model_dir(request, reference, tmp_path_factory) -> str:
    spec = reference.specs[FAMILIES[request.param]]
    spec = dataclasses.replace(spec, config={**spec.config, "num_hidden_layers": NUM_LAYERS})
    path = str(tmp_path_factory.mktemp(f"offload-{request.param}"))
    reference.save_tiny_model(spec, path, seed=3)
    return path


@pytest.fixture(scope="module")
def resident(model_dir):
    return LLM(model_dir, kv_cache_memory=1 << 22, swap_space=0).generate(PROMPTS, PARAMS)


def _assert_same(expected, actual) -> None:
    for want, got in zip(expected, actual):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for want_pos, got_pos in zip(want.outputs[0].logprobs, got.outputs[0].logprobs):
            assert want_pos.keys() == got_pos.keys()
            for token, lp in want_pos.items():
                assert abs(got_pos[token].logprob - lp.logprob) <= 1e-5


@pytest.mark.parametrize("kind", list(PLACEMENTS))
def test_offloaded_weights_give_the_resident_tokens_and_logprobs(model_dir, resident, kind, tmp_path):
    llm = LLM(model_dir, kv_cache_memory=1 << 22, swap_space=0, offload=PLACEMENTS[kind], offload_dir=str(tmp_path))
    streamer = llm.engine.runner.streamer
    tiers = streamer.placement.layer_tiers
    assert {"host": {Tier.HOST}, "disk": {Tier.DISK},
            "split": {Tier.DEVICE, Tier.HOST, Tier.DISK}}[kind] == set(tiers)
    files = {name.split("-")[0]: os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path)}
    for tier in (Tier.HOST, Tier.DISK):  # each tier's converted file holds exactly its layers' blobs
        blobs = [b for b in streamer.store.blobs.values() if b.tier is tier]
        assert files[tier.value] == sum(b.num_bytes for b in blobs)
    _assert_same(resident, llm.generate(PROMPTS, PARAMS))
    offloaded = streamer.placement.offloaded_layers
    assert streamer.bytes_fetched >= sum(streamer.store.blobs[i].num_bytes for i in offloaded)
    # outside a forward, off-device layers hold no weights at all: placeholders without storage
    layers = llm.engine.runner.model.model.layers
    for i, layer in enumerate(layers):
        devices = {t.device.type for t in list(layer.parameters()) + list(layer.buffers())}
        assert devices == ({"cpu"} if tiers[i] is Tier.DEVICE else {"meta"})
    streamer.close()
    assert os.listdir(tmp_path) == []  # converted files removed


def test_the_default_temporary_offload_dir_is_removed(model_dir, resident):
    llm = LLM(model_dir, kv_cache_memory=1 << 22, swap_space=0, offload="w=0/0/100")
    directory = llm.engine.runner.streamer.store.directory
    assert os.path.isdir(directory)
    _assert_same(resident, llm.generate(PROMPTS, PARAMS))
    llm.engine.runner.streamer.close()
    assert not os.path.exists(directory)


def test_packed_quantized_layers_stream_as_byte_blobs(tmp_path):
    # the default model: GGUF Q4_1 layers packed for the int4 kernel; the built-in kernel rule on both sides
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=1)
    prompt = "The capital of France is"
    want = LLM(kv_cache_memory=1 << 24, swap_space=0, kernels="default").generate(prompt, params)
    llm = LLM(kv_cache_memory=1 << 24, swap_space=0, kernels="default", offload="w=50/0/50",
              offload_dir=str(tmp_path))
    got = llm.generate(prompt, params)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    layer = llm.engine.runner.model.model.layers[-1]
    dtypes = {e.dtype for e in llm.engine.runner.streamer.store.blobs[len(llm.engine.runner.model.model.layers) - 1]
              .entries}
    assert torch.uint8 in dtypes or torch.int32 in dtypes  # packed int4 blocks travel as they are
    assert all(p.device.type == "meta" for p in layer.parameters())


def test_an_offloaded_layer_frees_its_memory_while_the_checkpoint_is_still_loading(model_dir, tmp_path):
    from roofline.loaders import open_model
    from roofline.models.registry import model_class
    from roofline.offload import LayerStore, StreamingExecutor, parse_placement

    source = open_model(model_dir)
    cfg = source.model_config()
    model = model_class(cfg)(cfg)
    layers = model.model.layers
    executor = StreamingExecutor(layers, parse_placement("w=50/0/50", NUM_LAYERS), LayerStore(str(tmp_path), False),
                                 torch.device("cpu"))
    held = {i: layers[i].mlp.down_proj.weight for i in range(NUM_LAYERS)}  # as the model's loader holds them
    freed_while_loading = []

    def recording(tensors):
        for item in tensors:  # before each tensor is handed over: is layer 2 (the first off-device one) gone yet?
            freed_while_loading.append(held[2].untyped_storage().nbytes() == 0)
            yield item

    model.load_weights(executor.wrap_loading(recording(source.tensors(torch.float32))))
    assert not freed_while_loading[0] and any(freed_while_loading)
    assert all(held[i].untyped_storage().nbytes() == 0 for i in (2, 3))
    assert all(held[i].untyped_storage().nbytes() > 0 for i in (0, 1))
    executor.close()


def test_the_converted_files_go_at_process_exit_without_close(model_dir, tmp_path):
    import subprocess
    import sys

    code = (f"from roofline import LLM; llm = LLM({model_dir!r}, kv_cache_memory=1 << 22, swap_space=0, "
            f"offload='w=0/50/50', offload_dir={str(tmp_path)!r}); import os; print(len(os.listdir({str(tmp_path)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"  # a host file and a disk file while it ran
    assert os.listdir(tmp_path) == []


def test_an_int4_layer_that_packs_itself_frees_its_unpacked_weight_too(model_dir, tmp_path):
    from roofline import quant
    from roofline.loaders import open_model
    from roofline.models.registry import model_class
    from roofline.offload import LayerStore, StreamingExecutor, parse_placement

    source = open_model(model_dir)
    cfg = source.model_config()
    model = model_class(cfg)(cfg)
    quant.quantize_model(model, quant.plan_quantization(model, "int4", 32))
    layers = model.model.layers
    unpacked = layers[3].mlp.gate_up_proj.weight  # one byte per value until the layer packs itself
    executor = StreamingExecutor(layers, parse_placement("w=50/0/50", NUM_LAYERS), LayerStore(str(tmp_path), False),
                                 torch.device("cpu"))
    model.load_weights(executor.wrap_loading(quant.route_tensors(model, source.tensors(torch.float32))))
    assert unpacked.untyped_storage().nbytes() == 0
    assert layers[3].mlp.gate_up_proj.weight.device.type == "meta"
    entry = next(e for e in executor.store.blobs[3].entries if e.module_path == "mlp.gate_up_proj" and e.attr == "weight")
    assert entry.num_bytes < unpacked.numel()  # what was stored is the packed form
    executor.close()
