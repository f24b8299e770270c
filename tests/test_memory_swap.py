"""Block swap and gradient checkpointing (musubi_pipe.memory): outputs and LoRA gradients equal the plain model's,
the rotating window keeps at most W + 1 blocks on the "device", and the placement comes back after every pass.

On this CPU-only machine the device is "cpu" with the synchronous copier (device copies are clones, told from
the CPU masters by storage pointer); the CUDA test runs where a GPU exists."""

from __future__ import annotations

import copy
from itertools import chain

import pytest
import torch
from torch import nn

from musubi_pipe.memory import checkpointing
from musubi_pipe.memory.block_swap import BlockSwap, SyncCopier
from musubi_pipe.memory.checkpointing import checkpoint_function
from musubi_pipe.models.hunyuan_video.family import HunyuanVideoFamily
from musubi_pipe.models.wan import names
from musubi_pipe.network.factory import build_network

diffusers = pytest.importorskip("diffusers")

WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                  out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=6, rope_max_seq_len=32)
HUNYUAN_CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                      num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                      guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=24, rope_axes_dim=(2, 6, 8))
BLOCKS = WAN_CONFIG["num_layers"]


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(**WAN_CONFIG).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def hunyuan():
    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(**HUNYUAN_CONFIG).eval().requires_grad_(False)


def wan_inputs(device="cpu"):
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g))
    return {k: v.to(device) for k, v in inputs.items()}


def hunyuan_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 1, 8, 8, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 6, 32, generator=g), encoder_attention_mask=torch.ones(1, 6),
                pooled_projections=torch.randn(1, 24, generator=g), guidance=torch.tensor([6000.0]))


def wan_targets(model):
    return {names.official_module_name(n): m for n, m in model.named_modules()
            if names.official_module_name(n) and isinstance(m, nn.Linear)}


def add_lora(targets, dropout=None):
    """A seeded LoRA on `targets` with random lora_up (so that every gradient is non-zero), applied."""
    torch.manual_seed(7)
    net = build_network(targets, {"network_module": "lora", "network_dim": 4, "network_alpha": 4,
                                  "network_dropout": dropout})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.normal_(std=0.1)
    net.apply_to()
    return net


def predict(model, inputs):
    return model(**inputs, return_dict=False)[0]


def train(model, net, inputs, steps=2):
    """[(loss, {name: grad})] over `steps` SGD steps, each with its own seed (LoRA dropout draws)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    results = []
    for step in range(steps):
        optimizer.zero_grad()
        torch.manual_seed(100 + step)
        loss = predict(model, inputs).float().pow(2).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
        optimizer.step()
    return results


def assert_same_training(expected, got):
    for (loss_a, grads_a), (loss_b, grads_b) in zip(expected, got, strict=True):
        torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)  # exact: the same kernels in the same order
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


def block_tensors(block):
    return list({id(t): t for t in chain(block.parameters(), block.buffers())}.values())


def start_placement(blocks, swapped):
    return ["device"] * (blocks - swapped) + ["cpu"] * swapped


def held(swap):
    """Which blocks are on the device or on their way there."""
    return [p != "cpu" for p in swap.placement()]


def held_at_start(blocks, swapped):
    return [i < blocks - swapped for i in range(blocks)]


class RecordingCopier(SyncCopier):
    """The synchronous copier, counting transfers started and not yet finished."""

    def __init__(self):
        super().__init__("cpu")
        self.outstanding = 0
        self.started = 0

    def start(self, masters):
        self.outstanding += 1
        self.started += 1
        return super().start(masters)

    def finish(self, handle):
        self.outstanding -= 1
        return super().finish(handle)


def watch(model, swapped):
    """Attach a BlockSwap with a RecordingCopier to `model`, plus a check at every block call (after the swap's
    own pre-hook): the running block uses device copies, and at most W + 1 blocks hold device copies (swapped in
    or in flight). Returns (swap, copier, the block indices called, in order)."""
    originals = [[t.data_ptr() for t in block_tensors(b)] for b in model.blocks]
    copier, calls = RecordingCopier(), []
    swap = BlockSwap(list(model.blocks), swapped, "cpu", copier=copier)
    swap.attach(model)

    def check(index):
        ptrs = [[t.data_ptr() for t in block_tensors(b)] for b in model.blocks]
        copies = [[p != o for p, o in zip(now, old)] for now, old in zip(ptrs, originals)]
        assert all(copies[index]), "the running block must use device copies, not the CPU masters"
        assert all(all(c) or not any(c) for c in copies), "a block is either wholly swapped in or wholly out"
        assert sum(all(c) for c in copies) + copier.outstanding <= BLOCKS - swapped + 1
        calls.append(index)

    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda b, a, index=index: check(index))
    return swap, copier, calls


@pytest.mark.parametrize("swapped", [1, 3, 5])
def test_inference_matches_and_window_holds(wan, swapped):
    model = copy.deepcopy(wan)
    for block in model.blocks:  # an fp8-style scale buffer: buffers are swapped like parameters
        block.attn1.to_q.register_buffer("scale_weight", torch.tensor(1.0))
    with torch.no_grad():
        expected = predict(wan, wan_inputs())
    swap, copier, calls = watch(model, swapped)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(predict(model, wan_inputs()), expected)
            assert held(swap) == held_at_start(BLOCKS, swapped)
    assert calls == list(range(BLOCKS)) * 2
    assert copier.started == BLOCKS - swapped + 2 * BLOCKS  # the first placement, then one fetch per block run


@pytest.mark.parametrize("swapped", [1, 3, 5])
def test_training_with_swap_matches_plain(wan, swapped):
    plain = copy.deepcopy(wan)
    expected = train(plain, add_lora(wan_targets(plain)), wan_inputs())
    model = copy.deepcopy(wan)
    net = add_lora(wan_targets(model))
    swap, copier, calls = watch(model, swapped)
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(swap=swap))
    assert_same_training(expected, train(model, net, wan_inputs()))
    assert swap.placement() == start_placement(BLOCKS, swapped)
    forward, backward = list(range(BLOCKS)), list(range(BLOCKS))[::-1]
    assert calls == (forward + backward) * 2
    # one fetch per swapped block in forward and again in backward, after the first placement; none repeated
    assert (copier.started, copier.outstanding) == (BLOCKS - swapped + 2 * 2 * swapped, 0)


def test_training_with_swap_and_cpu_offload_matches_plain(wan):
    plain = copy.deepcopy(wan)
    expected = train(plain, add_lora(wan_targets(plain)), wan_inputs())
    model = copy.deepcopy(wan)
    net = add_lora(wan_targets(model))
    swap, copier, calls = watch(model, 3)
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(cpu_offload=True, swap=swap))
    assert_same_training(expected, train(model, net, wan_inputs()))
    assert swap.placement() == start_placement(BLOCKS, 3)
    assert calls == (list(range(BLOCKS)) + list(range(BLOCKS))[::-1]) * 2
    assert (copier.started, copier.outstanding) == (3 + 2 * 2 * 3, 0)


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_training_fp8_blocks_with_swap_matches_plain(wan, cpu_offload):
    """fp8 layers save their weight Parameter for backward: swapping must not pull it from under them."""
    fp8 = pytest.importorskip("musubi_pipe.memory.fp8")
    base = copy.deepcopy(wan)
    assert fp8.quantize_linears(base, include=("blocks.",), scaled=True) == 10 * BLOCKS
    plain = copy.deepcopy(base)
    expected = train(plain, add_lora(wan_targets(plain)), wan_inputs())
    model = copy.deepcopy(base)
    net = add_lora(wan_targets(model))
    swap = watch(model, 3)[0]
    assert any(t.dtype == torch.float8_e4m3fn for t in block_tensors(model.blocks[5]))
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(cpu_offload=cpu_offload,
                                                                                        swap=swap))
    assert_same_training(expected, train(model, net, wan_inputs()))
    assert swap.placement() == start_placement(BLOCKS, 3)


class RecordingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """save_on_cpu counting what it packs and unpacks."""

    packed: list[torch.Tensor] = []
    unpacked = 0

    def __init__(self, pin_memory=False, device_type="cuda"):
        super().__init__(pin_memory, device_type)
        pack, unpack = self.pack_hook, self.unpack_hook

        def recording_pack(tensor):
            RecordingSaveOnCpu.packed.append(tensor)
            return pack(tensor)

        def recording_unpack(packed):
            RecordingSaveOnCpu.unpacked += 1
            return unpack(packed)

        self.pack_hook, self.unpack_hook = recording_pack, recording_unpack


def test_cpu_offload_saves_block_inputs_through_save_on_cpu(wan, monkeypatch):
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", RecordingSaveOnCpu)
    monkeypatch.setattr(RecordingSaveOnCpu, "packed", [])
    monkeypatch.setattr(RecordingSaveOnCpu, "unpacked", 0)
    plain = copy.deepcopy(wan)
    expected = train(plain, add_lora(wan_targets(plain)), wan_inputs(), steps=1)
    model = copy.deepcopy(wan)
    net = add_lora(wan_targets(model))
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(cpu_offload=True))
    got = train(model, net, wan_inputs(), steps=1)
    assert_same_training(expected, got)
    # per block exactly its three tensor inputs (hidden, text, timestep projection; RoPE is a tuple): nothing else
    shapes = [tuple(t.shape) for t in RecordingSaveOnCpu.packed]
    assert shapes == [(1, 32, 32), (1, 8, 32), (1, 6, 32)] * BLOCKS
    assert RecordingSaveOnCpu.unpacked == 3 * BLOCKS
    block0 = {n: g for n, g in got[0][1].items() if "blocks_0_" in n}
    assert len(block0) == 20 and all(g.abs().sum() > 0 for g in block0.values())


def test_cpu_offload_without_the_grad_input_fix_would_lose_gradients(wan, monkeypatch):
    model = copy.deepcopy(wan)
    add_lora(wan_targets(model))
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(cpu_offload=True))
    assert predict(model, wan_inputs()).requires_grad
    monkeypatch.setattr(checkpointing, "_with_grad_input", lambda args: args)
    with pytest.warns(UserWarning, match="requires_grad"):
        assert not predict(model, wan_inputs()).requires_grad


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_checkpointing_replays_dropout(wan, cpu_offload):
    plain = copy.deepcopy(wan)
    expected = train(plain, add_lora(wan_targets(plain), dropout=0.3), wan_inputs(), steps=1)
    undropped = copy.deepcopy(wan)
    assert not torch.equal(train(undropped, add_lora(wan_targets(undropped)), wan_inputs(), steps=1)[0][0],
                           expected[0][0]), "the dropout must change the loss, or this test proves nothing"
    model = copy.deepcopy(wan)
    net = add_lora(wan_targets(model), dropout=0.3)
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(cpu_offload=cpu_offload))
    assert_same_training(expected, train(model, net, wan_inputs(), steps=1))


@pytest.mark.parametrize("checkpointing_func", [None, "diffusers"])
def test_training_swap_without_our_checkpointing_raises(wan, checkpointing_func):
    model = copy.deepcopy(wan)
    add_lora(wan_targets(model))
    BlockSwap(list(model.blocks), 3, "cpu").attach(model)
    if checkpointing_func == "diffusers":
        model.enable_gradient_checkpointing()  # diffusers' own function does not tell the swapper what it runs
    with pytest.raises(RuntimeError, match=r"needs gradient checkpointing \(memory.gradient_checkpointing=true"):
        predict(model, wan_inputs())


@pytest.mark.parametrize("swapped", [0, -1, BLOCKS, BLOCKS + 1])
def test_blocks_to_swap_out_of_range(wan, swapped):
    with pytest.raises(ValueError, match=rf"memory.blocks_to_swap must be between 1 and {BLOCKS - 1}.*got {swapped}"):
        BlockSwap(list(wan.blocks), swapped, "cpu")


def test_trainable_block_parameters_are_refused(wan):
    model = copy.deepcopy(wan)
    model.blocks[2].ffn.net[2].weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"frozen base model.*'ffn.net.2.weight' requires grad"):
        BlockSwap(list(model.blocks), 3, "cpu")


def test_hunyuan_video_heterogeneous_blocks(hunyuan):
    family = HunyuanVideoFamily()
    with torch.no_grad():
        expected = predict(hunyuan, hunyuan_inputs())
    model = copy.deepcopy(hunyuan)
    blocks = family.blocks(model)
    assert [type(b).__name__ for b in blocks] == ["HunyuanVideoTransformerBlock"] * 2 + [
        "HunyuanVideoSingleTransformerBlock"] * 2
    swap = BlockSwap(blocks, 2, "cpu")
    swap.attach(model)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(predict(model, hunyuan_inputs()), expected)

    plain = copy.deepcopy(hunyuan)
    reference = train(plain, add_lora(family.lora_targets(plain)), hunyuan_inputs())
    net = add_lora(family.lora_targets(model))
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(swap=swap))
    assert_same_training(reference, train(model, net, hunyuan_inputs()))
    assert swap.placement() == start_placement(4, 2)


def test_offload_then_prepare_restores_outputs(wan):
    model = copy.deepcopy(wan)
    originals = [[t.data_ptr() for t in block_tensors(b)] for b in model.blocks]
    swap = BlockSwap(list(model.blocks), 2, "cpu")
    swap.attach(model)
    with torch.no_grad():
        expected = predict(model, wan_inputs())
        swap.offload()
        assert swap.placement() == ["cpu"] * BLOCKS
        assert [[t.data_ptr() for t in block_tensors(b)] for b in model.blocks] == originals
        swap.prepare()
        assert held(swap) == held_at_start(BLOCKS, 2)
        assert torch.equal(predict(model, wan_inputs()), expected)
        swap.offload()
        assert torch.equal(predict(model, wan_inputs()), expected)  # the model pre-hook prepares by itself


def test_masters_are_taken_once_and_reused(wan):
    model = copy.deepcopy(wan)
    params = list(model.parameters())
    originals = [[t.data_ptr() for t in block_tensors(b)] for b in model.blocks]
    net = add_lora(wan_targets(model))
    swap = BlockSwap(list(model.blocks), 3, "cpu", pinned=False)
    swap.attach(model)
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(swap=swap))
    train(model, net, wan_inputs())
    with torch.no_grad():
        predict(model, wan_inputs())
    swap.offload()
    # eviction points back at the very storage the masters were made of: no new CPU tensors, same Parameters
    assert [[t.data_ptr() for t in block_tensors(b)] for b in model.blocks] == originals
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))


def test_ensure_fetches_out_of_order_and_prepare_moves_only_misplaced(wan):
    model = copy.deepcopy(wan)
    copier = RecordingCopier()
    swap = BlockSwap(list(model.blocks), 3, "cpu", copier=copier)
    swap.prepare()
    assert swap.placement() == ["fetching"] * 3 + ["cpu"] * 3  # prepare starts the fetches, blocks wait for them
    swap.ensure(BLOCKS - 1)
    swap.ensure(1)
    assert swap.placement() == ["fetching", "device", "fetching", "cpu", "cpu", "device"]
    assert (copier.started, copier.outstanding) == (4, 2)
    swap.prepare()
    assert swap.placement() == ["fetching", "device", "fetching", "cpu", "cpu", "cpu"]
    assert (copier.started, copier.outstanding) == (4, 2)  # nothing fetched again

    # place_rest moves only what is elsewhere (here nothing: CPU is the device; the CUDA test moves for real)
    before = [t.data_ptr() for t in chain(model.parameters(), model.buffers())]
    swap.place_rest(model)
    assert [t.data_ptr() for t in chain(model.parameters(), model.buffers())] == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_match_plain(wan):
    plain = copy.deepcopy(wan).cuda()
    with torch.no_grad():
        expected = predict(plain, wan_inputs("cuda"))
    reference = train(plain, add_lora(wan_targets(plain)).cuda(), wan_inputs("cuda"))
    model = copy.deepcopy(wan)
    swap = BlockSwap(list(model.blocks), 3, "cuda")
    swap.place_rest(model)
    net = add_lora(wan_targets(model)).cuda()
    swap.attach(model)
    assert all(t.is_pinned() for b in model.blocks[3:] for t in block_tensors(b))
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(predict(model, wan_inputs("cuda")), expected)
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(cpu_offload=True, swap=swap))
    got = train(model, net, wan_inputs("cuda"))
    for (loss_a, grads_a), (loss_b, grads_b) in zip(reference, got, strict=True):
        torch.testing.assert_close(loss_b, loss_a)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    assert swap.placement() == start_placement(BLOCKS, 3)
    swap.offload()
    swap.place_rest(model, "cpu")  # parked, as an inactive expert
    assert all(t.is_cpu for t in chain(model.parameters(), model.buffers()))
