"""Precision modes and `auto`'s measured choice, on small torch modules."""

import pytest
import torch

from deployments.engines import precision


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 32))


@pytest.mark.parametrize(
    ("mode", "device", "says"),
    [("bnb-nf4", "cpu", "CUDA"), ("bnb-int8", "cpu", "CUDA"), ("int8", "cuda", "CPU only")],
)
def test_unsupported_combinations_fail_with_a_clear_message(mode, device, says):
    with pytest.raises(precision.UnsupportedPrecision, match=says):
        precision.check(mode, device)


def test_cpu_modes_are_supported_on_cpu():
    for mode in ("fp32", "bf16", "fp16", "int8"):
        precision.check(mode, "cpu")
    assert precision.candidates("cpu", generative=True) == ["fp32", "bf16", "int8"]


def test_weights_bytes_follow_the_precision_and_int8_keeps_outputs_close():
    x = torch.randn(32, 64)
    reference = mlp().eval()
    fp32 = precision.weights_bytes(reference)
    assert fp32 == (64 * 256 + 256 + 256 * 32 + 32) * 4
    assert precision.weights_bytes(precision.finish(mlp(), "bf16", "cpu")) == fp32 // 2
    int8 = precision.finish(mlp(), "int8", "cpu")
    assert fp32 / 4 < precision.weights_bytes(int8) < fp32 / 2  # int8 weights, fp32 biases
    with torch.inference_mode():
        assert precision.mean_cosine(reference(x), int8(x)) > 0.99


def test_weights_shared_by_two_layers_count_once():
    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 100, bias=False))
    model[1].weight = model[0].weight
    assert precision.weights_bytes(model) == 100 * 16 * 4


def test_agreement_measures():
    a = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert precision.top1_agreement(a, a) == 1.0
    assert precision.top1_agreement(a, a.flip(-1)) == 0.0
    scores = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert precision.spearman(scores, scores * 2 + 1) == pytest.approx(1.0)
    assert precision.spearman(scores, -scores) == pytest.approx(-1.0)


def test_auto_picks_the_fastest_mode_that_agrees_and_remembers_it(tmp_path):
    builds = []
    slow = {"fp32": 0.03, "bf16": 0.01, "int8": 0.0}
    outputs = {"fp32": torch.ones(4, 8), "bf16": torch.ones(4, 8), "int8": -torch.ones(4, 8)}

    def build(mode):
        builds.append(mode)
        if mode == "broken":
            raise RuntimeError("no kernel for this")
        return mode

    def probe(mode):
        import time

        time.sleep(slow[mode])
        return outputs[mode]

    options = ["fp32", "bf16", "broken", "int8"]
    args = (build, probe, precision.mean_cosine, 0.99, tmp_path)
    choice = precision.choose("key", options, *args)
    # int8 is fastest but disagrees; broken fails to build and is reported, not fatal.
    assert choice.precision == "bf16" and choice.measured
    by_mode = {t.precision: t for t in choice.trials}
    assert not by_mode["int8"].passed and by_mode["int8"].agreement < 0
    assert by_mode["broken"].error.startswith("RuntimeError")
    builds.clear()
    again = precision.choose("key", options, *args)
    assert again.precision == "bf16" and not again.measured and builds == []
    # Another key (another model or machine) measures again.
    assert precision.choose("other", ["fp32", "int8"], *args).precision == "fp32"


def test_an_explicit_precision_is_checked_not_measured(tmp_path):
    def fail(_):
        raise AssertionError("not measured")

    choice = precision.resolve("int8", "cpu", "k", fail, fail, precision.mean_cosine, 0.9, tmp_path)
    assert choice.precision == "int8" and choice.trials == []
    with pytest.raises(precision.UnsupportedPrecision):
        precision.resolve("bnb-nf4", "cpu", "k", fail, fail, precision.mean_cosine, 0.9, tmp_path)
