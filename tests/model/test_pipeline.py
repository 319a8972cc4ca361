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


def measured_flops(fn) -> int:
    """FLOPs torch's FlopCounterMode counts for fn() (attention through the math kernel, which it sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def training_step(model, batch):
    def step():
        out = model(batch)
        model.loss(out, batch).backward()
    return step


@pytest.mark.parametrize("routed", [False, True])
def test_flops_per_batch_against_flop_counter_on_a_training_step(tiny_model, routed):
    """flops_per_batch = what a forward + backward really multiplies, online text encoder included."""
    from composer_prx.algorithms.tread import apply_tread

    batch = image_batch(n=4, size=32)  # 64 image tokens
    if routed:
        apply_tread(tiny_model, 1, -2, 0.5)
    measured = measured_flops(training_step(tiny_model, batch))
    predicted = tiny_model.flops_per_batch(batch)
    # backward = 2 x forward, except that nothing needs the gradient of the inputs of the first layers
    assert 0.99 * predicted <= measured <= predicted, (measured, predicted)
    encoder = measured_flops(lambda: tiny_model.text_encoder.encode(batch["caption"]))
    assert encoder > 0 and tiny_model.text_encoder_flops(batch) == encoder
    tiny_model.generate(["a red circle"], size=(8, 8), steps=1)  # a later sampling call does not change it
    assert tiny_model.flops_per_batch(batch) == predicted


def test_precomputed_text_has_no_encoder_flops(tiny_model):
    batch = image_batch(n=2, size=32)
    emb, mask = tiny_model.encode_prompts(batch["caption"], torch.device("cpu"))
    pre = {"image": batch["image"], "text_emb": emb, "text_mask": mask}
    measured = measured_flops(training_step(tiny_model, pre))
    assert tiny_model.text_encoder_flops(pre) == 0
    assert 0.99 * tiny_model.flops_per_batch(pre) <= measured <= tiny_model.flops_per_batch(pre)


class MaskRecorder(torch.nn.Module):
    """Wraps a denoiser and records the text_mask of each call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.cfg, self.masks = inner, inner.cfg, []

    def forward(self, x_t, t, text, text_mask=None):
        self.masks.append(text_mask)
        return self.inner(x_t, t, text, text_mask)


def test_an_all_real_text_mask_is_skipped_without_a_device_sync(tiny_model):
    """The denoiser gets None when the loader sends no mask or the host mask is all True, else the mask."""
    from composer_prx.model.pipeline import PRXModel

    recorder = MaskRecorder(tiny_model.denoiser)
    model = PRXModel(recorder, tiny_model.text_encoder, caption_dropout=0.0)
    batch = image_batch(n=3)
    emb, mask = model.encode_prompts(batch["caption"], torch.device("cpu"))
    assert not mask.all()  # captions of different lengths: padded
    full = torch.ones_like(mask)
    out = model({"image": batch["image"], "text_emb": emb})  # loader: no padding
    assert recorder.masks[-1] is None and out.text_mask.all() and out.text_mask.shape == mask.shape
    model({"image": batch["image"], "text_emb": emb, "text_mask": full})
    assert recorder.masks[-1] is None
    model({"image": batch["image"], "text_emb": emb, "text_mask": mask})
    assert torch.equal(recorder.masks[-1], mask)
    model.caption_dropout = 0.5
    torch.manual_seed(0)
    out = model({"image": batch["image"].repeat(4, 1, 1, 1), "text_emb": emb.repeat(4, 1, 1)})
    assert not out.text_mask.all() and torch.equal(recorder.masks[-1], out.text_mask)  # dropped prompts masked
    meta_mask = full.to("meta")  # a mask in device memory: reading it would sync, so it is passed on
    assert not PRXModel._all_real({"text_emb": emb, "text_mask": meta_mask}, meta_mask)


def test_uint8_images_are_normalised_on_the_model_side(tiny_model):
    batch = image_batch(n=2)
    pixels = ((batch["image"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    as_float = dict(batch, image=pixels.float() / 127.5 - 1)
    as_uint8 = dict(batch, image=pixels)
    torch.manual_seed(5)
    a = tiny_model(as_float)
    torch.manual_seed(5)
    b = tiny_model(as_uint8)
    assert b.x.dtype == torch.float32
    torch.testing.assert_close(a.x_pred, b.x_pred)
    tiny_model.eval()
    first, second = tiny_model.eval_forward(as_float), tiny_model.eval_forward(as_uint8)
    for key in first:
        torch.testing.assert_close(first[key], second[key])
