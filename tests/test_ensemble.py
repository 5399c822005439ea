"""Soft vote, soup and test-time views with hand-picked tensors."""
import pytest
import torch

from tuneprod.final.ensemble import soft_vote, soup, tta_views, view_count, view_probabilities


def test_soft_vote_averages_probabilities_not_votes():
    a = torch.tensor([[0.6, 0.4, 0.0], [0.1, 0.1, 0.8]])
    b = torch.tensor([[0.0, 0.9, 0.1], [0.2, 0.5, 0.3]])
    c = torch.tensor([[0.55, 0.45, 0.0], [0.3, 0.3, 0.4]])
    vote = soft_vote([a, b, c])
    assert torch.allclose(vote, torch.tensor([[1.15, 1.75, 0.1], [0.6, 0.9, 1.5]]) / 3)
    # Two of three members pick class 0 for the first image, but the confident third carries the average.
    assert vote.argmax(1).tolist() == [1, 2]


def test_soup_is_the_uniform_average_and_keeps_integer_buffers():
    first = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(10)}
    second = {"w": torch.tensor([3.0, 6.0]), "bn.num_batches_tracked": torch.tensor(30)}
    third = {"w": torch.tensor([2.0, 1.0]), "bn.num_batches_tracked": torch.tensor(20)}
    averaged = soup([first, second, third])
    assert torch.equal(averaged["w"], torch.tensor([2.0, 3.0]))
    assert averaged["bn.num_batches_tracked"].item() == 10 and averaged["bn.num_batches_tracked"].dtype == torch.int64
    with pytest.raises(ValueError, match="one architecture"):
        soup([first, {"w": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(1)}])


def test_a_soup_of_linear_models_is_the_average_model():
    models = [torch.nn.Linear(3, 2) for _ in range(2)]
    souped = torch.nn.Linear(3, 2)
    souped.load_state_dict(soup([m.state_dict() for m in models]))
    x = torch.randn(4, 3)
    with torch.no_grad():  # linear in its weights: the soup's output is the members' average output
        assert torch.allclose(souped(x), (models[0](x) + models[1](x)) / 2, atol=1e-6)


@pytest.mark.parametrize("views, count", [((), 1), (("flip",), 2), (("scale",), 2), (("flip", "scale"), 4),
                                          (("crops",), 5), (("flip", "scale", "crops"), 12)])
def test_tta_view_counts_and_shapes(views, count):
    images = torch.randn(2, 3, 16, 16)
    seen = tta_views(images, views)
    assert len(seen) == count and all(v.shape == images.shape for v in seen)
    assert torch.equal(seen[0], images)


def test_views_are_what_they_say():
    images = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    identity, mirrored = tta_views(images, ("flip",))
    assert torch.equal(mirrored, torch.flip(images, dims=[3]))
    _, centre = tta_views(images, ("scale",))
    _, *corners = tta_views(images, ("crops",))
    # A zoom keeps the middle: the centre view's mean stays the image's, the corners' move towards their corner.
    assert centre.mean().item() == pytest.approx(images.mean().item(), abs=1e-4)
    top_left, bottom_left, top_right, bottom_right = (c.mean().item() for c in corners)
    assert top_left < top_right < bottom_left < bottom_right


def test_view_probabilities_average_softmax_over_views():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    images = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        expected = (model(images).softmax(1) + model(torch.flip(images, dims=[3])).softmax(1)) / 2
        assert torch.allclose(view_probabilities(model, images, ("flip",)), expected, atol=1e-6)
        assert torch.allclose(view_probabilities(model, images, ("flip",)).sum(1), torch.ones(3))


@pytest.mark.parametrize("views, passes", [((), 1), (("flip",), 2), (("crops",), 5), (("flip", "crops"), 10),
                                           (("flip", "scale", "crops"), 12)])
def test_view_count_is_the_number_of_forward_passes_per_image(views, passes):
    assert view_count(views) == passes


def test_a_weighted_vote_stays_in_full_precision_under_autocast():
    probabilities = [torch.tensor([[0.6, 0.4]]), torch.tensor([[0.1, 0.9]])]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vote = soft_vote(probabilities, [3, 1])
    assert vote.dtype == torch.float32 and torch.allclose(vote, torch.tensor([[0.475, 0.525]]))
