import pytest
import torch

from composer_prx import flow
from composer_prx.model.pipeline import FlowOutput
from tests.conftest import image_batch


def test_forward_returns_flow_output_consistent_with_flow(tiny_model):
    batch = image_batch()
    torch.manual_seed(3)
    out = tiny_model(batch)
    assert isinstance(out, FlowOutput)
    assert torch.equal(out.x, batch["image"])
    t = out.t[:, None, None, None]
    torch.testing.assert_close(out.v_target, (out.x_t - out.x) / t.clamp(min=0.05))  # both sides clamped
    torch.testing.assert_close(out.v_pred, (out.x_t - out.x_pred) / t.clamp(min=0.05))
    loss = tiny_model.loss(out, batch)
    torch.testing.assert_close(loss, (out.v_pred - out.v_target).square().mean())


def test_frozen_text_encoder_not_in_state_or_parameters(tiny_model):
    assert not any(k.startswith("text_encoder") or "_frozen" in k for k in tiny_model.state_dict())
    param_ids = {id(p) for p in tiny_model.parameters()}
    assert not any(id(p) in param_ids for p in tiny_model.text_encoder.parameters())


def test_caption_dropout_masks_whole_prompt(tiny_model):
    tiny_model.caption_dropout = 0.5
    torch.manual_seed(0)
    out = tiny_model(image_batch(n=64))
    dropped = ~out.text_mask.any(1)
    assert 15 < dropped.sum() < 50
    tiny_model.eval()
    assert tiny_model(image_batch(n=64)).text_mask.any(1).all()  # no dropout in eval


def test_precomputed_embeddings_batch(tiny_model):
    batch = image_batch(n=2)
    emb, mask = tiny_model.encode_prompts(batch["caption"], torch.device("cpu"))
    pre = {"image": batch["image"], "text_emb": emb, "text_mask": mask}
    tiny_model.eval()
    torch.manual_seed(1)
    a = tiny_model(batch)
    torch.manual_seed(1)
    b = tiny_model(pre)
    torch.testing.assert_close(a.x_pred, b.x_pred)


def test_eval_forward_bins_are_deterministic(tiny_model):
    batch = image_batch()
    tiny_model.eval()
    first = tiny_model.eval_forward(batch)
    second = tiny_model.eval_forward(batch)
    assert set(first) == {f"val_loss_t{t:.2f}" for t in tiny_model.eval_t_values}
    for key in first:
        torch.testing.assert_close(first[key], second[key])
        assert first[key].shape == (4,)
    metrics = tiny_model.get_metrics(is_train=False)
    for metric in metrics.values():
        tiny_model.update_metric(batch, first, metric)
    overall = metrics["val_loss"].compute()
    torch.testing.assert_close(overall, torch.stack([metrics[k].compute() for k in first]).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("guidance", ["none", "cfg"])
def test_generate_range_seed_and_shape(tiny_model, guidance):
    for p in tiny_model.denoiser.parameters():
        torch.nn.init.normal_(p, std=0.05)
    a = tiny_model.generate(["a red circle"], size=(16, 8), steps=3, guidance=guidance, seed=5)
    b = tiny_model.generate(["a red circle"], size=(16, 8), steps=3, guidance=guidance, seed=5)
    c = tiny_model.generate(["a red circle"], size=(16, 8), steps=3, guidance=guidance, seed=6)
    assert a.shape == (1, 3, 16, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert tiny_model.training  # restored


def test_generate_cfg_scale_one_equals_conditional(tiny_model):
    for p in tiny_model.denoiser.parameters():
        torch.nn.init.normal_(p, std=0.05)
    cond = tiny_model.generate(["a blue square"], size=8, steps=2, guidance="none", seed=1)
    cfg1 = tiny_model.generate(["a blue square"], size=8, steps=2, guidance="cfg", guidance_scale=1.0, seed=1)
    torch.testing.assert_close(cond, cfg1, rtol=1e-5, atol=1e-5)


def test_generate_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="guidance must be one of"):
        tiny_model.generate(["x"], size=8, guidance="pag")
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        tiny_model.generate(["x"], size=10)


def test_flops_per_batch_matches_denoiser_count(tiny_model):
    batch = image_batch()
    out = tiny_model(batch)
    n_txt = out.text.shape[1]
    expected = 3 * tiny_model.denoiser.matmul_flops(4, 16, n_txt)
    assert tiny_model.flops_per_batch(batch) == expected
    tiny_model.generate(["a red circle"], size=(8, 8), steps=1)  # a later sampling call does not change it
    assert tiny_model.flops_per_batch(batch) == expected
