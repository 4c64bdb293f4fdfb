"""DiAD's building blocks on the tiny random architecture: sampler, SG network, SFF, anomaly map, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from anomalib_diad import DiAD
from anomalib_diad.components import DDIMSampler, FeatureDistanceAnomalyMap, SemanticGuidedNetwork
from anomalib_diad.components.diffusers_models import build_ddim_scheduler, build_unet
from anomalib_diad.torch_model import DiADModel
from tests.tiny_models import TINY_DIAD_MODEL

TINY = {**TINY_DIAD_MODEL, "ddim_steps": 2}


@pytest.fixture(scope="module")
def tiny_model() -> DiADModel:
    torch.manual_seed(0)
    return DiADModel(**TINY).eval()


def test_ddim_timesteps_are_the_official_ones() -> None:
    sampler = DDIMSampler(num_steps=10, noise_timestep=999)
    assert sampler.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert sampler.alphas_cumprod[999].item() == pytest.approx(0.00466, abs=2e-5)
    assert sampler.alphas_previous[-1].item() == pytest.approx(sampler.alphas_cumprod[0].item())


@torch.no_grad()
def test_sampler_agrees_with_a_plain_diffusers_ddim_loop(tiny_model: DiADModel) -> None:
    """Same start latent and denoiser: our fixed-tensor loop and DDIMScheduler.add_noise/step give the same latent."""
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    sampler = DDIMSampler(num_steps=4, noise_timestep=999)

    def denoiser(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return tiny_model.predict_noise(noisy, timesteps, images)

    ours = sampler.sample(sampler.noise_to_start(latents, noise), denoiser)

    scheduler = build_ddim_scheduler()
    scheduler.set_timesteps(4)
    reference = scheduler.add_noise(latents, noise, torch.tensor([999]))
    for timestep in scheduler.timesteps:
        epsilon = denoiser(reference, timestep.expand(2))
        reference = scheduler.step(epsilon, timestep, reference, eta=0.0).prev_sample
    assert scheduler.timesteps.tolist() == [751, 501, 251, 1]
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, latents, atol=1e-2), "the loop must actually change the latent"


def test_truncated_schedule_starts_at_the_noise_timestep() -> None:
    """Steps at or below t_s only, the first update at t_s's noise level: an exact noise oracle recovers the latent."""
    sampler = DDIMSampler(num_steps=5, noise_timestep=300, schedule="truncated")
    assert sampler.timesteps.tolist() == [300, 240, 180, 120, 60]
    assert sampler.alphas[0] == sampler.alphas_cumprod[300]
    torch.testing.assert_close(sampler.alphas_previous[:-1], sampler.alphas[1:])
    assert sampler.alphas_previous[-1] == sampler.alphas_cumprod[0]
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)

    def recovered(sampler: DDIMSampler) -> torch.Tensor:
        return sampler.sample(sampler.noise_to_start(latents, noise), lambda noisy, timesteps: noise)

    final = sampler.alphas_cumprod[0]
    expected = final.sqrt() * latents + (1 - final).sqrt() * noise
    torch.testing.assert_close(recovered(sampler), expected)
    torch.testing.assert_close(recovered(DDIMSampler(10, 999, "truncated")), expected)
    official = recovered(DDIMSampler(10, 999, "official"))  # noised to 999, first update assumes 901
    assert (official - expected).abs().max() > 0.1
    # set_alpha_to_one: the last update lands on the clean latent itself, not re-noised to timestep 0's level
    for steps in (1, 2, 5):
        to_one = DDIMSampler(steps, 300, "truncated", set_alpha_to_one=True)
        assert to_one.alphas_previous[-1] == 1.0
        torch.testing.assert_close(recovered(to_one), latents)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((10, 300, "official"), "ddim_schedule 'official' always steps from 901 and so only fits noise_timestep 999"),
        ((10, 5, "truncated"), "ddim_steps 10 do not fit below noise_timestep 5"),
        ((10, 999, "img2img"), "Unknown ddim_schedule 'img2img'"),
    ],
)
def test_inconsistent_schedules_are_refused(arguments: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DDIMSampler(*arguments)


def test_training_noise_matches_the_scheduler() -> None:
    sampler, scheduler = DDIMSampler(), build_ddim_scheduler()
    latents, noise, timesteps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    torch.testing.assert_close(
        sampler.add_noise(latents, noise, timesteps), scheduler.add_noise(latents, noise, timesteps)
    )


@torch.no_grad()
def test_sg_residuals_start_at_zero_so_the_unet_is_unchanged(tiny_model: DiADModel) -> None:
    latents, images = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 128, 128)
    timesteps = torch.tensor([10, 900])
    residuals, mid = tiny_model.sg_network(latents, timesteps, tiny_model.context.expand(2, -1, -1), images)
    assert len(residuals) == 12 and all(not residual.any() for residual in residuals) and not mid.any()
    plain = tiny_model.unet(latents, timesteps, encoder_hidden_states=tiny_model.context.expand(2, -1, -1)).sample
    torch.testing.assert_close(tiny_model.predict_noise(latents, timesteps, images), plain)


def _train_sg_steps(sff_init: str, steps: int = 3) -> SemanticGuidedNetwork:
    torch.manual_seed(0)
    unet = build_unet("tiny").requires_grad_(False)
    network = SemanticGuidedNetwork(unet, (8, 16, 32, 32), sff_init=sff_init)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    context = torch.randn(2, 8, 32)
    for _ in range(steps):
        latents, images, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 128, 128), torch.randn(2, 4, 16, 16)
        timesteps = torch.randint(0, 1000, (2,))
        residuals, mid = network(latents, timesteps, context, images)
        prediction = unet(
            latents,
            timesteps,
            encoder_hidden_states=context,
            down_block_additional_residuals=residuals,
            mid_block_additional_residual=mid,
        ).sample
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(prediction, noise).backward()
        optimizer.step()
    return network


def _sff_weights(network: SemanticGuidedNetwork) -> list[torch.Tensor]:
    return [branch[0].weight for branches in network.sff.branches for branch in branches]


def test_sff_learns_by_default() -> None:
    network = _train_sg_steps("default")
    assert all(weight.grad is not None and weight.grad.abs().sum() > 0 for weight in _sff_weights(network))
    assert network.controlnet.controlnet_down_blocks[6].weight.abs().sum() > 0, "zero conv 6 (an SFF source) learns"


def test_sff_never_learns_with_the_official_zero_init() -> None:
    network = _train_sg_steps("zero")
    assert all(not weight.any() and not weight.grad.any() for weight in _sff_weights(network))
    for index in (6, 7, 8):  # SFF's sources: their zero convs receive no gradient either
        assert not network.controlnet.controlnet_down_blocks[index].weight.any()
    assert network.controlnet.controlnet_down_blocks[9].weight.abs().sum() > 0, "the deepest zero convs do learn"


def test_only_the_deepest_skips_get_residuals() -> None:
    network = _train_sg_steps("default", steps=2)
    with torch.no_grad():
        residuals, _ = network(
            torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 8, 32), torch.randn(1, 3, 128, 128)
        )
    assert all(not residual.any() for residual in residuals[:9])
    assert all(residual.any() for residual in residuals[9:])


def test_from_scratch_defaults_train_the_whole_unet_on_the_inference_timesteps(monkeypatch) -> None:
    """Without diffusion weights: whole UNet trained on the sampler's own timesteps, truncated schedule ending at the
    clean latent; with them the official setup (t ~ U{0..999}, steps 901..1 ending at timestep 0's level)."""
    scratch = DiAD(**TINY, diffusion_weights=None, pre_trained=False).model
    assert all(parameter.requires_grad for parameter in scratch.unet.parameters())
    assert (scratch.sampler.schedule, scratch.sampler.noise_timestep, scratch.train_timesteps) == (
        "truncated",
        300,
        "sampler",
    )
    assert scratch.posterior == "mode" and scratch.sampler.set_alpha_to_one
    official = DiAD(**TINY, diffusion_weights="some/sd15", pre_trained=False).model
    assert not any(parameter.requires_grad for parameter in official.unet.down_blocks.parameters())
    assert (official.sampler.schedule, official.sampler.noise_timestep, official.max_train_timestep) == (
        "official",
        999,
        999,
    )
    assert official.train_timesteps == "uniform" and not official.sampler.set_alpha_to_one
    for model, expected in ((scratch, {300, 150}), (DiADModel(**TINY, max_train_timestep=300), set(range(301)))):
        drawn = _drawn_training_timesteps(model, monkeypatch)
        assert drawn <= expected and len(drawn) >= min(len(expected), 40)


def _drawn_training_timesteps(model: DiADModel, monkeypatch: pytest.MonkeyPatch, steps: int = 20) -> set[int]:
    """The timesteps that ``steps`` stage-2 training passes of ``model`` (batches of 4) noise their latents to."""
    drawn = []
    monkeypatch.setattr(
        model.sampler, "add_noise", lambda latents, noise, timesteps: drawn.append(timesteps) or latents
    )
    model.train()
    for _ in range(steps):
        model.diffusion_training_forward(torch.randn(4, 3, 128, 128))
    return set(torch.cat(drawn).tolist())


def test_trainable_parameters_per_stage() -> None:
    model = DiADModel(**TINY)
    trainable = {
        name.split(".")[0] + "." + name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad
    }
    assert {
        "sg_network.controlnet",
        "sg_network.sff",
        "unet.up_blocks",
        "unet.conv_norm_out",
        "unet.conv_out",
    } == trainable
    model.set_stage("autoencoder")
    assert {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad} == {"autoencoder"}


def test_map_constants_scale_with_the_input_size() -> None:
    from anomalib_diad.components.anomaly_map import scaled_map_constants

    assert scaled_map_constants((256, 256)) == (5.0, 8)
    assert scaled_map_constants((128, 192)) == (2.5, 4)
    assert scaled_map_constants((512, 512)) == (10.0, 16)
    scorer = FeatureDistanceAnomalyMap("resnet18", ["layer1"], (128, 128))
    assert (scorer.sigma, scorer.score_pool_size, scorer.blur.kernel.shape[-1]) == (2.5, 4, 21)


def test_latent_scale_is_one_over_the_latent_std_and_used_by_encode() -> None:
    torch.manual_seed(0)
    model = DiADModel(**TINY).eval()
    assert model.latent_scale.item() == pytest.approx(0.18215)
    images = [torch.randn(4, 3, 128, 128), torch.randn(2, 3, 128, 128)]
    scale = model.set_latent_scale_from(images)
    noise = torch.randn(6, 4, 16, 16)
    with torch.no_grad():
        unscaled = model.unscaled_latents(torch.cat(images), noise)
        scaled = model.encode(torch.cat(images), noise)
    assert scale != pytest.approx(0.18215, rel=0.05)
    assert model.state_dict()["latent_scale"].item() == pytest.approx(scale)
    torch.testing.assert_close(scaled, unscaled * scale)
    assert scaled.std().item() == pytest.approx(1.0, rel=0.05)  # posterior samples, as stage 2 trains on


def test_posterior_mode_ignores_the_evaluation_noise() -> None:
    images = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    for posterior, changes in (("mode", False), ("sample", True)):
        torch.manual_seed(0)
        model = DiADModel(**TINY, stage="autoencoder", posterior=posterior).eval()
        with torch.no_grad():
            before = model.reconstruct(images)
            model.evaluation_noise[0].normal_()
            after = model.reconstruct(images)
        assert (not torch.allclose(before, after)) == changes, posterior


def test_image_score_and_gaussian_kernel() -> None:
    scorer = FeatureDistanceAnomalyMap(
        "resnet18", ["layer1", "layer2", "layer3"], (128, 128), sigma=5.0, score_pool_size=8
    )
    assert scorer.blur.kernel.shape[-1] == 41
    anomaly_map = torch.zeros(2, 1, 128, 128)
    anomaly_map[1, :, 40:104, 40:104] = 1.0  # a 64x64 square: fully covers the 57x57 receptive field of 8 poolings
    assert scorer.image_score(anomaly_map).tolist() == pytest.approx([0.0, 1.0])
    anomaly_map[1, :, 40:104, 40:104] = 0.0
    anomaly_map[1, :, 64, 64] = 1.0  # a single pixel is averaged away almost completely
    assert 0 < scorer.image_score(anomaly_map)[1].item() < 1e-2


@torch.no_grad()
def test_an_image_gets_the_same_score_alone_and_in_a_batch(tiny_model: DiADModel) -> None:
    images = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    batch = tiny_model(images)
    alone = tiny_model(images[1:2])
    assert batch.pred_score.shape == (3,) and batch.anomaly_map.shape == (3, 1, 128, 128)
    torch.testing.assert_close(alone.pred_score, batch.pred_score[1:2])
    torch.testing.assert_close(tiny_model(images).pred_score, batch.pred_score)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"input_size": (96, 96)}, "multiples of 64"),
        ({"input_size": (64, 64)}, "at least 128"),
        ({"architecture": "huge"}, "Unknown DiAD architecture 'huge'"),
        ({"sff_init": "ones"}, "Unknown sff_init 'ones'"),
        ({"inject_levels": "some"}, "Unknown inject_levels 'some'"),
        ({"stage": "both"}, "Unknown stage 'both'"),
        ({"posterior": "mean"}, "Unknown posterior 'mean'"),
        ({"train_timesteps": "all"}, "Unknown train_timesteps 'all'"),
        ({"ddim_steps": 0}, "ddim_steps must be in"),
        ({"max_train_timestep": 1000}, "max_train_timestep must be in"),
    ],
)
def test_bad_arguments_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiADModel(**{**TINY, **overrides})


def test_wrong_image_size_is_named(tiny_model: DiADModel) -> None:
    with pytest.raises(ValueError, match=r"\[B, 3, 128, 128\], got \(1, 3, 256, 256\)"):
        tiny_model(torch.zeros(1, 3, 256, 256))


def test_sd15_without_weights_is_refused() -> None:
    with pytest.raises(ValueError, match="needs diffusion_weights"):
        DiAD(architecture="sd15", diffusion_weights=None)


def test_offline_hub_weights_fail_fast_with_the_fix() -> None:
    from anomalib_diad.components.diffusers_models import load_pretrained_unet

    with pytest.raises(RuntimeError, match="--model.diffusion_weights /path/to/stable-diffusion-v1-5"):
        load_pretrained_unet("someone/not-cached-sd15")


def test_local_folder_without_unet_is_named(tmp_path) -> None:
    from anomalib_diad.components.diffusers_models import load_pretrained_unet

    with pytest.raises(FileNotFoundError, match=f"'{tmp_path}' has no 'unet' folder"):
        load_pretrained_unet(str(tmp_path))


def test_missing_autoencoder_checkpoint_is_named(tmp_path) -> None:
    model = DiAD(**TINY, diffusion_weights=None, pre_trained=False, autoencoder_checkpoint=str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match="nope.ckpt' does not exist"):
        model.on_fit_start()


def test_plugins_import_without_diffusers() -> None:
    """Without diffusers: OneNIP never needs it, anomalib_diad imports, and building DiAD says how to install it."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'diffusers' or name.startswith('diffusers.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import anomalib_onenip\n"
        "import anomalib_diad\n"
        "from anomalib.models import DiAD\n"
        "try:\n"
        "    DiAD(architecture='tiny', input_size=(128, 128), diffusion_weights=None, pre_trained=False,\n"
        "         backbone='resnet18')\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'pip install "anomalib-multiclass-models[diad]"' in result.stdout


def test_importing_onenip_does_not_import_diffusers() -> None:
    code = "import anomalib_onenip, anomalib.models, sys; print('diffusers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"


def test_eval_path_exports_with_torch_export() -> None:
    """The whole anomalib forward (pre-processing, fixed-length DDIM loop, scoring, post-processing) traces."""
    model = DiAD(**TINY, diffusion_weights=None, pre_trained=False, visualizer=False).eval()
    images = torch.rand(1, 3, 128, 128)
    exported = torch.export.export(model, (images,))
    with torch.no_grad():
        expected, actual = model(images), exported.module()(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map)


def test_stage_two_takes_the_latent_scale_of_stage_one(tmp_path) -> None:
    stage1 = DiAD(**TINY, stage="autoencoder", diffusion_weights=None, pre_trained=False)
    stage1.model.set_latent_scale_from([torch.randn(2, 3, 128, 128)])
    torch.save({"state_dict": stage1.state_dict()}, tmp_path / "stage1.ckpt")
    checkpoint = str(tmp_path / "stage1.ckpt")
    stage2 = DiAD(**TINY, diffusion_weights=None, pre_trained=False, autoencoder_checkpoint=checkpoint)
    stage2.on_fit_start()
    assert stage2.model.latent_scale.item() == stage1.model.latent_scale.item() != pytest.approx(0.18215)
    torch.testing.assert_close(stage2.model.autoencoder.state_dict(), stage1.model.autoencoder.state_dict())


def test_unusable_autoencoder_checkpoints_are_named(tmp_path) -> None:
    garbage, foreign = tmp_path / "garbage.ckpt", tmp_path / "foreign.ckpt"
    garbage.write_text("not a checkpoint")
    torch.save({"state_dict": {"model.unet.conv_in.weight": torch.zeros(1)}}, foreign)
    for path, message in ((garbage, "Cannot read autoencoder_checkpoint"), (foreign, "holds no DiAD autoencoder")):
        model = DiAD(**TINY, diffusion_weights=None, pre_trained=False, autoencoder_checkpoint=str(path))
        with pytest.raises(ValueError, match=message):
            model.on_fit_start()


def test_sd15_architecture_has_the_official_parameter_counts() -> None:
    """SD-1.5 UNet 859.52 M, KL-f8 autoencoder 83.65 M, SG network 361.28 M, SFF 110.59 M (built on the meta device)."""
    from anomalib_diad.components.diffusers_models import build_autoencoder

    def millions(module: torch.nn.Module) -> float:
        return round(sum(parameter.numel() for parameter in module.parameters()) / 1e6, 2)

    with torch.device("meta"):
        unet, autoencoder = build_unet("sd15"), build_autoencoder("sd15")
        network = SemanticGuidedNetwork(unet, (16, 32, 96, 256))
    assert (millions(unet), millions(autoencoder)) == (859.52, 83.65)
    assert (millions(network.controlnet), millions(network.sff)) == (361.28, 110.59)


def test_an_unknown_category_is_refused_and_untagged_images_are_served() -> None:
    """One rule for both models: a category tag the model was not trained on is an error that names it."""
    from types import SimpleNamespace

    model = DiAD(**TINY, diffusion_weights=None, pre_trained=False)
    model.category_names = ["brick", "grass"]
    images = torch.zeros(2, 3, 128, 128)
    assert model.category_index(SimpleNamespace(image=images, category=["grass", "brick"])).tolist() == [1, 0]
    assert model.category_index(SimpleNamespace(image=images, category=None)) is None
    with pytest.raises(ValueError, match=r"Categories \['marble'\] were not in DiAD's training data .* Train the model"):
        model.category_index(SimpleNamespace(image=images, category=["brick", "marble"]))


def test_a_known_posterior_gives_the_same_training_step_without_the_encoder(tiny_model: DiADModel) -> None:
    images = torch.randn(3, 3, 128, 128)
    tiny_model.train()
    try:
        posterior = tiny_model.latent_posterior(images)
        torch.manual_seed(5)
        encoded = tiny_model.diffusion_training_forward(images)
        torch.manual_seed(5)
        calls = []
        handle = tiny_model.autoencoder.encoder.register_forward_hook(lambda *_: calls.append(1))
        cached = tiny_model.diffusion_training_forward(images, posterior)
        handle.remove()
    finally:
        tiny_model.eval()
    assert not calls, "the encoder ran although the posterior was given"
    assert torch.equal(cached.noise, encoded.noise)
    assert torch.equal(cached.noise_prediction, encoded.noise_prediction)


def test_stage_two_encodes_each_training_image_once_for_the_same_loss(tiny_dataset, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A training step with the posterior cache and one without it: the same loss; the cache ran the encoder once
    per training image, the step never."""
    from anomalib.engine import Engine
    from lightning.pytorch import Callback, seed_everything

    from anomalib_multiclass import MultiClassAD
    from tests.tiny_models import TINY_DIAD

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.values.append(float(outputs["loss"]))

    def train(cache: bool) -> tuple[list[float], int, int]:
        seed_everything(3)
        model = DiAD(**TINY_DIAD, normalize_per_category=False, accumulate_grad_batches=1)
        if not cache:
            monkeypatch.setattr(model, "cache_posteriors", lambda dataloader: None)
        encoded = []
        model.model.autoencoder.encoder.register_forward_hook(lambda module, inputs, output: encoded.append(len(output)))
        datamodule = MultiClassAD(root=tiny_dataset, categories=["brick", "grass"], train_batch_size=4, num_workers=0)
        losses = Losses()
        engine = Engine(max_steps=1, accelerator="cpu", default_root_dir=tmp_path / str(cache), logger=False,
                        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[losses])
        engine.fit(model=model, datamodule=datamodule)
        return losses.values, sum(encoded), len(datamodule.train_data)

    cached_losses, cached_encodings, images = train(cache=True)
    plain_losses, plain_encodings, _ = train(cache=False)
    assert cached_encodings == images, "the cache encodes every training image once, and the step nothing"
    assert plain_encodings == 4, "without the cache the step encodes its 4 images"
    assert len(cached_losses) == 1
    assert cached_losses == pytest.approx(plain_losses, rel=1e-5)
