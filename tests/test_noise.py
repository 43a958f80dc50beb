import pytest
import torch
from diffusers import DDPMScheduler

from refseg.core.errors import ModelError
from refseg.core.noise import add_noise, alphas_cumprod, make_noise, noise_seed

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("config", [
    SD,
    dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2"),
    dict(num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3, 0.4]),
])
def test_alphas_cumprod_matches_diffusers(config):
    acp = alphas_cumprod(config)
    assert acp.dtype == torch.float64
    assert torch.equal(acp.float(), DDPMScheduler(**config).alphas_cumprod)


def test_sd_schedule_values():
    acp = alphas_cumprod(SD)
    assert acp.shape == (1000,)
    assert acp[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert acp[999].item() == pytest.approx(0.00466, rel=1e-2)  # SD's terminal ᾱ
    assert bool((acp[1:] < acp[:-1]).all())


def test_unknown_schedule_is_a_model_error():
    with pytest.raises(ModelError, match="beta_schedule='sigmoid'"):
        alphas_cumprod(dict(SD, beta_schedule="sigmoid"))


@pytest.mark.parametrize("t", [1, 5, 500, 999])
def test_add_noise_equals_diffusers_scheduler(t):
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = DDPMScheduler(**SD).add_noise(z0, eps, torch.full((3,), t))
    assert torch.equal(add_noise(z0, t, eps, alphas_cumprod(SD)), expected)


def test_add_noise_per_sample_timesteps():
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    ts = torch.tensor([0, 5, 500])
    acp = alphas_cumprod(SD)
    out = add_noise(z0, ts, eps, acp)
    assert torch.equal(out[0], z0[0])  # T = 0 in a mixed batch is still z0 itself
    assert torch.equal(out[1:], DDPMScheduler(**SD).add_noise(z0[1:], eps[1:], ts[1:]))


def test_t0_returns_z0_unchanged():
    z0 = torch.randn(2, 4, 8, 8)
    out = add_noise(z0, 0, torch.randn(2, 4, 8, 8), alphas_cumprod(SD))
    assert torch.equal(out, z0)
    assert out.dtype == torch.float32


def test_noise_seed_is_stable_and_distinct():
    assert noise_seed(0, 1, 5) == noise_seed(0, 1, 5)
    seeds = {noise_seed(s, i, t) for s in (0, 1) for i in (1, 2, 1000) for t in (0, 5, 500)}
    assert len(seeds) == 18
    assert all(0 <= s < 2**63 for s in seeds)
    # Pinned: a cache written by an earlier version must get the same ε.
    assert noise_seed(0, 1, 5) == 4468823515962335140


def test_make_noise_is_independent_of_order_batch_and_global_seed():
    a = make_noise((4, 8, 8), 0, 42, 500)
    torch.manual_seed(123)  # the global generator plays no part
    others = [make_noise((4, 8, 8), 0, i, 500) for i in (7, 3, 42, 9)]
    assert torch.equal(others[2], a)
    assert a.dtype == torch.float32 and a.device.type == "cpu"
    assert not torch.equal(make_noise((4, 8, 8), 0, 42, 5), a)  # other T
    assert not torch.equal(make_noise((4, 8, 8), 1, 42, 500), a)  # other noise seed
    big = make_noise((4, 64, 64), 0, 42, 500)
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02


# ---- one noise convention across DDPM and flow-matching models (DESIGN §5) -------------------------------

@pytest.fixture(scope="module")
def flux():
    from refseg.backbones.loading import load_backbone

    return load_backbone("tiny-flux", device="cpu")


def test_t500_has_the_same_snr_on_sd_and_on_a_flow_matching_model(tiny_backbone, flux):
    """--noise-t 500 on tiny (SD, DDPM) and on tiny-flux (flow matching): the same signal-to-noise ratio."""
    ddpm, flow = tiny_backbone.noise_input(t=500), flux.noise_input(t=500)
    assert (ddpm.kind, flow.kind) == ("ddpm", "flow") and ddpm.level == flow.level == 500
    abar = float(alphas_cumprod(SD)[500])
    assert ddpm.alpha_bar == abar and ddpm.snr == pytest.approx(abar / (1 - abar), rel=1e-12)
    assert flow.snr == pytest.approx(ddpm.snr, rel=1e-12)
    assert ((1 - flow.sigma) / flow.sigma) ** 2 == pytest.approx(ddpm.snr, rel=1e-12)
    assert flow.model_timestep == flow.sigma  # FLUX is given σ (its pipeline passes timestep / 1000)
    assert ddpm.model_timestep == 500


@pytest.mark.parametrize("t", [0, 1, 5, 261, 500, 999])
def test_flow_sigma_of_t_maps_back_to_t(t):
    from refseg.core.noise import flow_sigma_for_t, nearest_sd_t, noise_input

    sigma = flow_sigma_for_t(t)
    assert nearest_sd_t(sigma) == t  # a σ-given level named by its T lands in the T's group
    given = noise_input(kind="flow", sigma=sigma, timestep_scale=1000.0)
    assert given.level == t and given.t is None and given.model_timestep == pytest.approx(sigma * 1000)
    assert given.to_attrs()["given"] == "sigma" and given.to_attrs()["sigma"] == sigma


def test_noise_latents_ddpm_is_add_noise_and_flow_is_the_interpolation():
    from refseg.core.noise import noise_input, noise_latents

    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for t in (0, 5, 500, 999):
        ddpm = noise_input(SD, t=t)
        assert torch.equal(noise_latents(z0, ddpm, eps), add_noise(z0, t, eps, alphas_cumprod(SD)))
    flow = noise_input(kind="flow", sigma=0.25)
    assert torch.allclose(noise_latents(z0, flow, eps), 0.75 * z0 + 0.25 * eps)
    assert torch.equal(noise_latents(z0, noise_input(kind="flow", t=0), eps), z0)  # T = 0: z0 itself


def test_noise_refusals():
    from refseg.core.noise import noise_input

    with pytest.raises(ModelError, match="--noise-sigma gives a flow-matching σ"):
        noise_input(SD, sigma=0.5)
    with pytest.raises(ModelError, match=r"--noise-sigma must be in \[0, 1\)"):
        noise_input(kind="flow", sigma=1.0)
    with pytest.raises(ModelError, match="--timestep is for UNet"):
        noise_input(kind="flow", t=5, timestep=1)


def test_a_store_group_holds_one_noise_level(tmp_path):
    """Two σ that name the same group are refused; the same σ resumes; an old group (no new attrs) reads."""
    from _cache_util import open_writer

    from refseg.cache.reader import open_cache
    from refseg.core.errors import CacheMismatchError
    from refseg.core.noise import flow_sigma_for_t, noise_input

    writer = open_writer(tmp_path / "c.zarr")
    first = noise_input(kind="flow", sigma=flow_sigma_for_t(500))
    writer.add_noise_level(500, noise=first)
    writer.add_noise_level(500, noise=noise_input(kind="flow", t=500))  # the same σ, named by T: the same level
    other = noise_input(kind="flow", sigma=flow_sigma_for_t(500) + 1e-4)
    assert other.level == 500
    with pytest.raises(CacheMismatchError, match="T=500 extracted with timestep"):
        writer.add_noise_level(500, noise=other)
    writer.add_noise_level(7, timestep=7)  # as stores made before the convention: noise_t and timestep only
    writer.close()
    cache = open_cache(tmp_path / "c.zarr")
    assert cache.noise(500)["sigma"] == first.sigma and cache.noise(500)["given"] == "sigma"
    # an old group: computed from the store's recorded scheduler, or said "not recorded" when it has none
    assert cache.noise(7)["alpha_bar"] == "not recorded" and cache.noise(7)["model_timestep"] == 7


def test_levels_of_one_run_sharing_a_group_are_refused_or_merged(flux, tiny_backbone):
    from refseg.core.errors import RefsegError
    from refseg.core.noise import flow_sigma_for_t
    from refseg.extract.config import ExtractionConfig
    from refseg.extract.resolve import noise_levels

    def levels(backbone, ts=(), sigmas=()):
        cfg = ExtractionConfig(data_root="d", dataset="refcoco-synth", split="val", out="o", noise_ts=ts,
                               noise_sigmas=sigmas)
        return noise_levels(cfg, backbone)

    assert [n.level for n in levels(flux, (0, 500), (0.3,))] == [0, 500, 138]
    assert [n.t for n in levels(flux, (500,), (flow_sigma_for_t(500),))] == [500]  # the same level, kept once
    with pytest.raises(RefsegError, match="--noise-t 500 and --noise-sigma 0.6181 would both be stored as noise "
                                          "level t0500"):
        levels(flux, (500,), (0.6181,))
    with pytest.raises(ModelError, match="--noise-sigma gives a flow-matching σ"):
        levels(tiny_backbone, (), (0.3,))
    assert [n.level for n in levels(tiny_backbone)] == [0]  # neither flag: T = 0, as before


def test_only_noise_sigma_on_the_command_line_drops_the_default_t0():
    from refseg.extract.config import ExtractionConfig, with_preset

    cfg = ExtractionConfig(data_root="d", dataset="refcoco-synth", split="val", out="o", noise_sigmas=(0.3,))
    assert cfg.noise_ts == (0,)  # the field's default, as --help shows it
    assert with_preset(cfg, None, explicit={"noise_sigmas"}).noise_ts == ()
    assert with_preset(cfg, None, explicit={"noise_sigmas", "noise_ts"}).noise_ts == (0,)  # --noise-t 0 given


def test_a_group_written_before_the_convention_reads_with_values_computed_from_the_scheduler(tmp_path):
    from _cache_util import settings, tables, tiny_spec

    from refseg.cache.reader import open_cache
    from refseg.cache.opening import NewStore
    from refseg.cache.writer import CacheWriter

    recorded = settings()
    recorded["backbone"]["scheduler"] = dict(SD, prediction_type="epsilon")  # as a backbone identity records it
    samples, images = tables()
    with CacheWriter.open(tmp_path / "old.zarr", NewStore(spec=tiny_spec(), extraction_record=recorded,
                                                          samples=samples, images=images)) as writer:
        writer.add_noise_level(500, timestep=500)  # what every store before the convention wrote
        writer.add_noise_level(0, timestep=1)  # VPD's
    cache = open_cache(tmp_path / "old.zarr")
    abar = float(alphas_cumprod(SD)[500])
    assert cache.noise(500) == {"kind": "ddpm", "alpha_bar": abar, "snr": pytest.approx(abar / (1 - abar)),
                                "model_timestep": 500, "given": "t"}
    assert cache.noise(0)["alpha_bar"] == 1.0 and cache.noise(0)["snr"] is None and cache.noise(0)["model_timestep"] == 1
    assert "ddpm alpha_bar 1 snr inf (no noise)" in cache.describe()
