"""train.gather: a model that FSDP2 sharded (one gloo CPU process) comes back with whole plain tensors."""
import pytest
import torch

from conftest import tiny_llama
from mpokit.train.gather import gather_sharded_, is_main_process


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_plain_model_is_left_alone():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not gather_sharded_(model) and is_main_process()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fsdp2_shards_are_gathered_into_the_same_weights_and_saved(one_process_group, tmp_path):
    from torch.distributed.fsdp import fully_shard

    from mpokit.io.checkpoint import load_compressed, save_compressed
    from torch.distributed.tensor import DTensor

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        expected = model(x).logits
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    with torch.no_grad():  # the root keeps its parameters unsharded after a forward: views of FSDP's buffers
        model(x)
    assert any(isinstance(p, DTensor) for p in model.parameters())
    assert gather_sharded_(model) and is_main_process()
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    state = model.state_dict()
    assert all(torch.equal(before[k], state[k]) for k in before), "a gathered tensor differs from the original"
    assert type(model).__name__ == "LlamaForCausalLM" and type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    with torch.no_grad():  # a plain model again: no FSDP hook runs
        assert torch.equal(model(x).logits, expected)
    back = load_compressed(save_compressed(model, tmp_path / "model")).state_dict()
    assert all(torch.equal(before[k], back[k]) for k in before)
