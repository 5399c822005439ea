"""Heads and fine-tuning schedules: GeM, cosine/ArcFace heads, gallery prediction, LP-FT, layer decay, EMA, and the
artifact round trip with a gallery. Hand-picked numbers where the arithmetic is the point; tiny timm models else."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from tests.helpers import write_image_folder
from tuneprod.final import artifact
from tuneprod.spec import Hyperparams, SpecError, TrialConfig, parse_space
from tuneprod.train.cache import decoded
from tuneprod.train.data import index_images, validation_split
from tuneprod.train.heads import GeM, HeadedModel, add_margin, build_model, classifier_parameters, gallery_scores
from tuneprod.train.loop import TrainingRun, parameter_groups, predict_logits

ARCFACE = {"head": "arcface", "pooling": "gem", "embedding_size": 16, "subcenters": 2, "scale": 16.0,
           "margin": 0.3, "predict_by": "knn", "knn_k": 3, "fusion": 0.5}


def test_gem_is_average_pooling_at_p_1_and_nears_max_pooling_as_p_grows():
    features = torch.rand(2, 3, 4, 4) + 0.1
    assert torch.allclose(GeM(1.0, learnable=False)(features), features.mean((2, 3)), atol=1e-6)
    p3, p16 = GeM(3.0, learnable=False)(features), GeM(16.0, learnable=False)(features)
    assert (features.mean((2, 3)) < p3).all() and (p3 < p16).all() and (p16 <= features.amax((2, 3))).all()
    tokens = torch.rand(2, 5, 3) + 0.1  # a transformer's tokens: pooled over the sequence
    assert torch.allclose(GeM(1.0, learnable=False)(tokens), tokens.mean(1), atol=1e-6)


def test_gem_p_learns_only_when_asked():
    learnable, fixed = GeM(3.0, learnable=True), GeM(3.0, learnable=False)
    learnable(torch.rand(2, 3, 4, 4) + 0.1).sum().backward()
    assert learnable.p.grad is not None and learnable.p.grad.abs() > 0
    assert not list(fixed.parameters()) and "p" in dict(fixed.named_buffers())


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_vit"])
@pytest.mark.parametrize("head", ["linear", "cosine", "arcface"])
def test_heads_give_class_logits_and_gradients_everywhere(backbone, head):
    hp = Hyperparams(backbone=backbone, **{**ARCFACE, "head": head, "predict_by": "head"}) if head != "linear" \
        else Hyperparams(backbone=backbone, head="linear", pooling="gem")
    model = build_model(hp, num_classes=5, image_size=32)
    assert isinstance(model, HeadedModel)
    images, targets = torch.randn(4, 3, 32, 32), F.one_hot(torch.tensor([0, 1, 2, 4]), 5).float()
    logits = model(images, targets) if model.uses_targets else model(images)
    assert logits.shape == (4, 5)
    F.cross_entropy(logits, targets).backward()
    assert all(p.grad is not None for p in model.parameters()), [n for n, p in model.named_parameters()
                                                                   if p.grad is None]
    if head != "linear":  # cosines times the scale
        model.eval()
        assert model(images).abs().max() <= hp.scale + 1e-4


def test_the_plain_recipe_stays_timms_own_classifier():
    model = build_model(Hyperparams(backbone="test_resnet"), num_classes=3, image_size=32)
    assert not isinstance(model, HeadedModel) and model.num_classes == 3


def test_the_arcface_margin_widens_the_target_angle_only():
    cosines = torch.tensor([[0.5, 0.8, -0.99]])
    one_hot = torch.tensor([[0.0, 1.0, 0.0]])
    margined = add_margin(cosines, one_hot, 0.5)
    assert margined[0, 0] == pytest.approx(0.5, abs=1e-6) and margined[0, 2] == pytest.approx(-0.99, abs=1e-6)
    assert margined[0, 1] == pytest.approx(math.cos(math.acos(0.8) + 0.5), abs=1e-6)
    shared = add_margin(cosines, torch.tensor([[0.5, 0.5, 0.0]]), 0.5)  # a mixed target shares the margin out
    assert shared[0, 0] == pytest.approx(math.cos(math.acos(0.5) + 0.25), abs=1e-6)
    capped = add_margin(torch.tensor([[-0.99]]), torch.tensor([[1.0]]), 1.5)  # past pi the angle stops growing
    assert capped[0, 0] == pytest.approx(-1.0, abs=1e-6)


def unit(*angles_deg):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles_deg])


def test_knn_votes_with_similarity_over_the_k_nearest():
    gallery, labels = unit(0, 10, 20, 90), torch.tensor([0, 1, 1, 2])
    query = unit(2)
    one = gallery_scores(query, gallery, labels, 3, "knn", k=1)
    assert one.argmax().item() == 0 and one[0, 1:].tolist() == [0.0, 0.0]
    three = gallery_scores(query, gallery, labels, 3, "knn", k=3)  # two of class 1 outvote the nearest
    assert three.argmax().item() == 1
    assert three[0, 1].item() == pytest.approx((math.cos(math.radians(8)) + math.cos(math.radians(18))) / 3)


def test_knn_with_k_past_the_gallery_uses_the_whole_gallery_and_ties_go_to_the_lower_class():
    gallery, labels = unit(10, -10), torch.tensor([1, 0])
    scores = gallery_scores(unit(0), gallery, labels, 2, "knn", k=50)
    assert scores[0, 0] == pytest.approx(scores[0, 1].item()) and scores.argmax().item() == 0
    assert scores[0, 0].item() == pytest.approx(math.cos(math.radians(10)) / 2)


def test_centroids_compare_with_each_class_mean_and_an_empty_class_scores_minus_one():
    gallery, labels = unit(0, 40, 90), torch.tensor([0, 0, 1])
    scores = gallery_scores(unit(20), gallery, labels, 3, "centroid", k=5)
    assert scores[0, 0].item() == pytest.approx(1.0, abs=1e-6)  # the mean of 0 and 40 degrees points at 20
    assert scores[0, 1].item() == pytest.approx(math.cos(math.radians(70)), abs=1e-6)
    assert scores[0, 2].item() == -1.0


def test_spec_refuses_head_parameters_the_space_never_uses():
    parse_space({"head": {"choice": ["linear", "arcface"]}, "margin": {"uniform": [0.1, 0.5], "when": {"head": "arcface"}}})
    with pytest.raises(ValueError, match=r"space.margin: applies only when head is arcface, but space.head never "
                                         r"is \(it takes \['linear'\]\)"):
        parse_space({"margin": 0.3})
    with pytest.raises(ValueError, match="space.knn_k: applies only when predict_by is knn"):
        parse_space({"head": "cosine", "predict_by": "centroid", "knn_k": 3})
    with pytest.raises(ValueError, match="space.probe_epochs: applies only when finetune is lp-ft"):
        parse_space({"probe_epochs": 2})


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    images = decoded(index_images(write_image_folder(tmp_path_factory.mktemp("h") / "images", per_class=8)), 32)
    return images.classes, *validation_split(images, 0.25, seed=0)


def run_with(split, epochs=2, **hyperparams) -> TrainingRun:
    classes, train, val = split
    hp = Hyperparams(**{"backbone": "test_resnet", "batch_size": 8, "lr": 3e-3, **hyperparams})
    return TrainingRun(TrialConfig(hp, image_size=32, epochs=epochs), classes, train, val)


def snapshot(parameters):
    return [p.detach().clone() for p in parameters]


def changed(before, parameters):
    return [not torch.equal(b, p.detach()) for b, p in zip(before, parameters)]


@pytest.mark.parametrize("extra", [{}, ARCFACE])
def test_lp_ft_freezes_exactly_the_body_for_the_probe_epochs(split, extra):
    run = run_with(split, epochs=3, finetune="lp-ft", probe_epochs=2, **extra)
    head = classifier_parameters(run.model)
    head_ids = {id(p) for p in head}
    body = [p for p in run.model.parameters() if id(p) not in head_ids]
    in_body = (lambda key: key.startswith("body.")) if isinstance(run.model, HeadedModel) else (lambda key: True)
    body_state = {k: v.clone() for k, v in run.model.state_dict().items() if "running_mean" in k and in_body(k)}
    assert body_state
    for epoch in range(2):
        body_before, head_before = snapshot(body), snapshot(head)
        run.step()
        assert not any(changed(body_before, body)), f"the body moved in probe epoch {epoch + 1}"
        assert all(changed(head_before, head)), f"the head stood still in probe epoch {epoch + 1}"
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in body_state.items())  # batch norm kept too
    body_before = snapshot(body)
    run.step()
    assert all(changed(body_before, [p for p in body if p.ndim > 1]))  # fine-tuning moves every weight


@pytest.mark.parametrize("hp", [Hyperparams(backbone="test_efficientnet", layer_decay=0.7),
                                Hyperparams(backbone="test_efficientnet", layer_decay=0.7, **ARCFACE)])
def test_layer_decay_groups_hold_every_parameter_once_with_lr_falling_towards_the_input(hp):
    model = build_model(hp, num_classes=4, image_size=32)
    groups = parameter_groups(model, hp)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for p in model.parameters()}
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    names = dict(model.named_parameters())
    head_lr = lr_of[id(classifier_parameters(model)[0])]
    stem = "body.conv_stem.weight" if "body.conv_stem.weight" in names else "conv_stem.weight"
    assert head_lr == pytest.approx(hp.lr) and lr_of[id(names[stem])] < head_lr
    layers = len({round(lr, 12) for lr in lr_of.values()})
    assert min(lr_of.values()) == pytest.approx(hp.lr * hp.layer_decay ** (layers - 1))
    assert all(group["weight_decay"] == hp.weight_decay for group in groups)
    assert parameter_groups(model, Hyperparams(layer_decay=1.0))[0]["params"] == list(model.parameters())


def test_ema_update_is_the_warmed_up_moving_average():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 1.0)
    ema = ModelEmaV3(model, decay=0.9, use_warmup=True)
    torch.nn.init.constant_(model.weight, 3.0)
    ema.update(model, step=5)  # warmup: decay 1 - (1 + 4) ** -2/3 = 0.658, below the 0.9 asked
    decay = 1 - 5 ** (-2 / 3)
    assert ema.module.weight.item() == pytest.approx(decay * 1.0 + (1 - decay) * 3.0)
    ema.update(model, step=10_000)  # warmed up: the decay asked
    assert ema.module.weight.item() == pytest.approx(0.9 * (decay + (1 - decay) * 3.0) + 0.1 * 3.0)


def test_with_ema_the_average_is_evaluated_and_handed_over(split):
    run = run_with(split, epochs=2, ema_decay=0.9)
    metrics = run.step()
    assert run.eval_model is run.ema.module and run.final_model() is run.ema.module
    assert any(changed(snapshot(run.model.parameters()), run.ema.module.parameters()))
    assert metrics["val_acc"] == pytest.approx(accuracy(run.ema.module, run))
    state = run.state_dict()
    again = run_with(split, epochs=2, ema_decay=0.9)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.ema.module.state_dict().values(),
                                                 run.ema.module.state_dict().values()))


def accuracy(model, run) -> float:
    hits = seen = 0
    for logits, labels in predict_logits(model, run.val_batches.epoch(), run.device):
        hits += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return hits / seen


def test_trials_score_by_the_gallery_rule_the_final_model_uses(split):
    run = run_with(split, epochs=2, **ARCFACE)
    metrics = run.step()
    assert len(run.model.gallery) == 0  # evaluation's gallery is not carried into training
    model = run.final_model()
    assert model.gallery.shape == (len(split[1]), 16) and model.gallery_labels.tolist() == split[1].labels.tolist()
    assert metrics["val_acc"] == pytest.approx(accuracy(model, run))


def test_the_artifact_carries_the_gallery_and_predicts_the_same(split, tmp_path):
    run = run_with(split, epochs=1, **ARCFACE)
    run.step()
    model = run.final_model()
    folder = artifact.save(tmp_path / "model", model, split[0], run.preprocessing, run.config, {})
    member = artifact.load_member(folder, torch.device("cpu"), "m")
    assert torch.equal(member.model.gallery, model.gallery)
    assert torch.equal(member.model.gallery_labels, model.gallery_labels)
    images = next(iter(run.val_batches.epoch()))[0]
    with torch.no_grad():
        assert torch.allclose(member.model(images), model(images), atol=1e-5)


def test_a_spec_with_a_head_validates_through_the_file(tmp_path):
    from tuneprod.spec import load_spec

    path = tmp_path / "s.yaml"
    path.write_text("data: {demo: d}\nspace: {head: linear, scale: 20}\n")
    with pytest.raises(SpecError, match=r"s.yaml: space.scale: applies only when head is cosine or arcface"):
        load_spec(path)


@pytest.mark.slow
def test_a_search_over_heads_hands_over_a_model_with_its_gallery(tmp_path):
    import json
    import subprocess
    import sys

    import pandas as pd
    from safetensors.torch import load_file

    from tests.helpers import shrunk_space
    from tuneprod.demo import generate_demo

    generate_demo(tmp_path / "demo", classes=3, train_per_class=6, test_per_class=2, size=32)
    space = shrunk_space("demo.yaml", tmp_path, data={"demo": str(tmp_path / "demo"), "image_size": 32},
                         search={"num_samples": 2, "scheduler": {"type": "fifo", "max_epochs": 2}},
                         final={"members": 2, "seeds": 1, "soup": True},
                         space={"head": {"choice": ["cosine", "arcface"]}, "pooling": "gem", "embedding_size": 16,
                                "predict_by": "knn", "finetune": "lp-ft", "ema_decay": 0.9, "layer_decay": 0.8})
    done = subprocess.run([sys.executable, "-m", "tuneprod.cli", "search", str(space), "--storage",
                           str(tmp_path / "runs")], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    experiment = tmp_path / "runs" / "shrunk_demo"
    table = pd.read_parquet(experiment / "trials.parquet")
    assert len(table) == 2 and set(table["head"]) <= {"cosine", "arcface"} and table["val_acc"].notna().all()
    ensemble = json.loads((experiment / "final" / "ensemble.json").read_text())
    assert ensemble["soups"] == {}  # members that predict by their gallery are never averaged
    for member in ensemble["members"]:
        weights = load_file(str(experiment / "final" / member / "model.safetensors"))
        assert weights["gallery"].shape == (18, 16) and weights["gallery_labels"].shape == (18,)
    predictions = pd.read_csv(experiment / "predictions.csv")
    assert len(predictions) == 6 and predictions["label"].notna().all()


def test_the_evaluation_speed_counts_the_gallery_images_it_embedded(split, monkeypatch):
    # The budget prices predictions from this speed: forward passes per second, whatever they were for.
    from tuneprod.train import loop

    run = run_with(split, epochs=1, **ARCFACE)
    clock = iter([0.0, 1.0])  # evaluate reads the clock twice: the pass takes one second
    monkeypatch.setattr(loop, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(clock))}))
    metrics = run.evaluate()
    assert metrics["eval_images_per_s"] == len(split[1]) + len(split[2])


@pytest.mark.parametrize("head, predict_by", [("linear", "head"), ("cosine", "head"), ("cosine", "knn"),
                                              ("arcface", "centroid")])
def test_whether_a_model_predicts_by_a_gallery_is_decided_once_by_its_hyperparameters(split, head, predict_by):
    run = run_with(split, epochs=1, head=head, predict_by=predict_by, pooling="gem")
    expected = head != "linear" and predict_by != "head"
    assert run.config.hp.predicts_by_gallery == expected
    assert run.model.needs_gallery == run.predicts_by_gallery == expected
    assert len(run.final_model().gallery) == (len(split[1]) if expected else 0)
