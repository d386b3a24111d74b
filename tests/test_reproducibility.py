"""Reproducibility of training (masks alone: test_seeding.py): one torch.manual_seed gives the same
trained weights, and a run resumed from a checkpoint that holds the model, the optimizer and the
RNG state continues bit for bit."""
import copy

import torch

from helpers import flat_parameters, small_resnet


def new_training(method="sample"):
    model = small_resnet(method)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train(model, optimizer, steps):
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        optimizer.step()


def test_same_seed_same_trained_weights_for_both_methods():
    for method in ("sample", "block"):
        runs = []
        for _ in range(2):
            model, optimizer = new_training(method)
            train(model, optimizer, 3)
            runs.append(flat_parameters(model))
        assert torch.equal(*runs), method


def test_resume_from_checkpoint_continues_bit_for_bit():
    model, optimizer = new_training()
    train(model, optimizer, 5)
    uninterrupted = flat_parameters(model)

    model, optimizer = new_training()
    train(model, optimizer, 2)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "rng": torch.get_rng_state()})  # on GPUs add torch.cuda.get_rng_state_all()
    train(model, optimizer, 1)  # work lost when the job stopped

    model, optimizer = new_training()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    train(model, optimizer, 3)
    assert torch.equal(flat_parameters(model), uninterrupted)
