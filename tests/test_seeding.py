"""Seeds come from PyTorch's generators, so torch.manual_seed and generator= reproduce a run."""
import torch

from helpers import kept_rows, random_tensor
from stochdepth_kernels import drop_path, fused_drop_path_add

X = random_tensor((512, 3))


def masks(**kwargs):
    return kept_rows(drop_path(X, 0.5, **kwargs))


def test_manual_seed_reproduces_masks():
    torch.manual_seed(17)
    first = [masks() for _ in range(3)]
    torch.manual_seed(17)
    second = [masks() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])  # consecutive calls draw fresh masks


def test_generator_isolates_the_stream():
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = masks(generator=gen_a)
    assert torch.equal(state, torch.get_rng_state())  # the global generator did not move
    torch.manual_seed(1)
    b = masks(generator=gen_b)
    assert torch.equal(a, b)


def test_no_draw_in_eval_or_at_p_zero():
    torch.manual_seed(3)
    state = torch.get_rng_state()
    fused_drop_path_add(X, X, 0.5, training=False)
    drop_path(X, 0.0)
    assert torch.equal(state, torch.get_rng_state())


def test_seed_int_and_tensor_agree_and_select_the_mask():
    assert torch.equal(masks(seed=2**40 + 1), masks(seed=torch.tensor([2**40 + 1])))
    assert not torch.equal(masks(seed=1), masks(seed=2))


def test_backends_share_the_drawn_seed():
    torch.manual_seed(9)
    native = masks(backend="cpu")
    torch.manual_seed(9)
    assert torch.equal(native, masks(backend="reference"))
