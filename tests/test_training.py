import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from quantlab import training
from quantlab.data import BACKGROUND, embedded_split
from quantlab.models import Net, NetBN, ResNet


@pytest.fixture(scope="module")
def small():
    x_tr, y_tr, x_te, y_te = embedded_split()
    train = DataLoader(TensorDataset(x_tr[:512], y_tr[:512]), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=500)
    return train, test


@pytest.mark.parametrize("cls,params", [(Net, 11170), (NetBN, 11330)])
def test_models_shapes_and_parameter_counts(cls, params):
    m = cls()
    assert sum(p.numel() for p in m.parameters()) == params
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_random_shift_moves_whole_pixels_and_fills_background():
    x = torch.full((4, 1, 28, 28), BACKGROUND)
    x[:, 0, 10:18, 10:18] = 2.0
    g = torch.Generator().manual_seed(0)
    y = training.random_shift(x, 2, g)
    assert y.shape == x.shape
    for i in range(4):
        rows = torch.nonzero(y[i, 0].max(dim=1).values > 0).flatten()
        cols = torch.nonzero(y[i, 0].max(dim=0).values > 0).flatten()
        assert len(rows) == 8 and len(cols) == 8
        assert abs(rows[0].item() - 10) <= 2 and abs(cols[0].item() - 10) <= 2
    assert set(y.unique().tolist()) == set(x.unique().tolist())
    assert torch.equal(training.random_shift(x, 0, g), x)


def test_training_is_deterministic_and_learns(small):
    train, test = small
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Net()
        hist = training.train(model, train, epochs=2, progress=False)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert hist["loss"][1] < hist["loss"][0] and len(hist["accuracy"]) == 2
    assert training.evaluate(model, test) > 0.5


def test_train_uses_a_models_own_defaults(small):
    train, _ = small
    model = Net()
    model.default_lr = 1e-4
    hist = training.train(model, train, epochs=1, progress=False)
    assert hist["lr"][0] == pytest.approx(1e-4)
    assert hist["lr_end"] == pytest.approx(0.0, abs=1e-12)   # the cosine schedule ends at 0
    with pytest.raises(ValueError, match="epochs"):
        training.train(model, train, epochs=0)


def test_the_cosine_schedule_steps_after_every_batch(small):
    train, _ = small
    torch.manual_seed(0)
    hist = training.train(Net(), train, epochs=2, lr=2e-3, progress=False)
    n_batches = len(train)
    T = 2 * n_batches
    rates = hist["lr_batches"]
    assert len(rates) == T and n_batches > 1
    # batch t trains with lr (1 + cos(pi t / T)) / 2: a new rate for every batch, not one per epoch
    assert rates == pytest.approx([2e-3 * (1 + math.cos(math.pi * t / T)) / 2 for t in range(T)], rel=1e-12)
    assert len(set(rates[:n_batches])) == n_batches
    assert [rates[0], rates[n_batches]] == hist["lr"]          # each epoch starts with its first batch's rate


def test_train_records_each_epochs_test_predictions(small):
    train, test = small
    torch.manual_seed(0)
    model = Net()
    hist = training.train(model, train, epochs=2, eval_loader=test, progress=False)
    preds = hist["eval_predictions"]
    assert len(preds) == len(hist["eval_accuracy"]) == 2
    labels = torch.cat([y for _, y in test])
    for pred, acc in zip(preds, hist["eval_accuracy"]):
        assert pred.shape == labels.shape and pred.dtype == torch.int64
        assert acc == (pred == labels).float().mean().item()
    assert torch.equal(preds[-1], training.predict(model, test)[0])   # the last: the trained model's


def test_evaluate_accepts_a_callable(small):
    _, test = small
    model = training.pretrained("net")
    assert training.evaluate(model, test) == training.evaluate(lambda x: model(x), test)


@pytest.mark.parametrize("name,cls", [("net", Net), ("netbn", NetBN), ("resnet", ResNet)])
def test_pretrained_checkpoints(name, cls, small):
    _, test = small
    model = training.pretrained(name)
    assert isinstance(model, cls) and not model.training
    acc = training.evaluate(model, test)
    assert acc >= 0.96
    assert acc == pytest.approx(training.pretrained_info(name)["embedded_test_accuracy"], abs=2e-3)
    assert (training.WEIGHTS_DIR / f"{name}.pt").stat().st_size < 200_000


def test_pretrained_official_accuracy(official_mnist_root):
    from quantlab.data import official_test_set
    loader = DataLoader(official_test_set(official_mnist_root), batch_size=1000)
    assert training.evaluate(training.pretrained("net"), loader) >= 0.98


def test_pretrained_rejects_unknown_name():
    with pytest.raises(ValueError, match="name must be one of"):
        training.pretrained("resnet50")


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = Net()
    sha = training.save_checkpoint(model, tmp_path / "m.pt")
    loaded = training.load_checkpoint(Net(), tmp_path / "m.pt", sha256=sha)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  loaded.state_dict().values()))
    with pytest.raises(ValueError, match="does not match NetBN"):
        training.load_checkpoint(NetBN(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="checksum"):
        training.load_checkpoint(Net(), tmp_path / "m.pt", sha256="0" * 64)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch state_dict"):
        training.load_checkpoint(Net(), tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        training.load_checkpoint(Net(), tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state_dict"):
        training.load_checkpoint(Net(), tmp_path / "list.pt")


def test_a_refused_checkpoint_leaves_the_model_unchanged(tmp_path):
    # conv1 reads 3 channels in the file: every other tensor has the right shape, and torch's
    # load_state_dict would copy those before raising for conv1.weight
    _ = torch.manual_seed(1)
    training.save_checkpoint(Net(num_channels=3), tmp_path / "rgb.pt")
    _ = torch.manual_seed(2)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="size mismatch for conv1.weight"):
        training.load_checkpoint(model, tmp_path / "rgb.pt")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), \
        [k for k in before if not torch.equal(before[k], after[k])]
    # the same with strict=False (torch raises for a shape mismatch there too)
    with pytest.raises(ValueError, match="size mismatch"):
        training.load_checkpoint(model, tmp_path / "rgb.pt", strict=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("correct, total", [(979, 1000), (0, 10), (10, 10), (1, 3), (744, 1000)])
def test_wilson_interval_matches_scipy(correct, total):
    stats = pytest.importorskip("scipy.stats")
    ref = stats.binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = training.wilson_interval(correct, total)
    assert lo == pytest.approx(float(ref.low), abs=1e-8) and hi == pytest.approx(float(ref.high), abs=1e-8)
    assert lo <= correct / total <= hi


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError, match="correct <= total"):
        training.wilson_interval(11, 10)
    with pytest.raises(TypeError, match="ints"):
        training.wilson_interval(0.9, 10)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400), st.integers(0, 400))
def test_mcnemar_p_value_matches_scipy_binomtest(only_a, only_b):
    stats = pytest.importorskip("scipy.stats")
    n = only_a + only_b
    ref = 1.0 if n == 0 else stats.binomtest(only_a, n, 0.5).pvalue
    assert training.mcnemar_p_value(only_a, only_b) == pytest.approx(ref, rel=1e-9, abs=1e-300)


def test_mcnemar_exact_values_by_hand():
    # 0 against 5 discordant digits: 2 * (1/2)^5 = 1/16
    assert training.mcnemar_p_value(0, 5) == 1 / 16
    assert training.mcnemar_p_value(5, 0) == 1 / 16
    assert training.mcnemar_p_value(3, 3) == 1.0
    assert training.mcnemar_p_value(0, 0) == 1.0
    # huge counts stay finite and tiny, not NaN or an overflow
    assert 0 < training.mcnemar_p_value(0, 3000) < 1e-300 or training.mcnemar_p_value(0, 3000) == 0.0
    assert training.mcnemar_p_value(1500, 1500) == 1.0


def test_compare_predictions_counts_only_discordant_digits():
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 3)
    a = labels.clone()
    b = labels.clone()
    b[:7] = (b[:7] + 1) % 10          # b wrong on 7 digits a gets right
    a[21] = 0                         # both wrong on digit 21 (label 1): not discordant
    b[21] = 2
    a[29] = 0                         # a wrong on one digit b gets right
    c = training.compare_predictions(a, b, labels)
    assert (c.only_a, c.only_b) == (7, 1)
    assert c.p_value == pytest.approx(2 * (1 + 8) / 2 ** 8)     # 0.0703: not significant at 5%
    assert c.verdict == "no measurable difference"
    b[7:10] = (b[7:10] + 1) % 10      # three more digits only a gets right: 10 against 1
    c = training.compare_predictions(a, b, labels)
    assert (c.only_a, c.only_b, c.verdict) == (10, 1, "better")
    assert training.compare_predictions(b, a, labels).verdict == "worse"
    assert "right only in a: 10" in str(c) and "p = 0.0117" in str(c)
    # wider alpha: 7 against 1 becomes "better" at 10%
    assert training.compare_predictions(a, b, labels, alpha=0.5).verdict == "better"


@pytest.mark.parametrize("kwargs, match", [
    ({"pred_a": torch.zeros(3, dtype=torch.long), "pred_b": torch.zeros(4, dtype=torch.long)},
     "same length"),
    ({"pred_a": torch.zeros(3)}, "integer tensor"),
    ({"pred_a": torch.zeros(3, 2, dtype=torch.long)}, "1-D"),
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": float("nan")}, "alpha"),
    ({"pred_a": "abc"}, "pred_a"),
])
def test_compare_predictions_rejects_bad_input(kwargs, match):
    args = {"pred_a": torch.zeros(3, dtype=torch.long), "pred_b": torch.zeros(3, dtype=torch.long),
            "labels": torch.zeros(3, dtype=torch.long), **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        training.compare_predictions(**args)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_mcnemar_p_value_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="only_a"):
        training.mcnemar_p_value(bad, 2)
