"""load_pipeline: every kind of spec, and clear errors that never trigger a download."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import difftune
from difftune.models.embedded import DigitsDiTPipeline
from tests.models.tiny_pipelines import build


def test_embedded_and_path_load_the_same_weights(embedded_pipe, tmp_path):
    embedded_pipe.save_pretrained(tmp_path / "copy")
    again = difftune.load_pipeline(str(tmp_path / "copy"))
    assert isinstance(again, DigitsDiTPipeline)
    assert difftune.describe(again).fingerprint == difftune.describe(embedded_pipe).fingerprint


def test_pipeline_object_is_returned_as_is(embedded_pipe):
    assert difftune.load_pipeline(embedded_pipe) is embedded_pipe


def test_directory_without_model_index(tmp_path):
    with pytest.raises(difftune.ModelError, match=r"model_index\.json"):
        difftune.load_pipeline(tmp_path)


def test_uncached_hub_id_is_never_downloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("load_pipeline tried to download")

    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "download", no_network)
    with pytest.raises(difftune.ModelError, match="hf download someone/some-model"):
        difftune.load_pipeline("someone/some-model")


def test_cached_hub_id_loads_offline(monkeypatch, tmp_path, embedded_pipe):
    """A hub id whose snapshot is in the local cache loads from there with local_files_only."""
    import diffusers

    calls = {}
    monkeypatch.setattr("difftune.models._load.is_available_locally", lambda repo: True)

    def fake_from_pretrained(name, **kwargs):
        calls.update(kwargs, name=name)
        return embedded_pipe

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", fake_from_pretrained)
    assert difftune.load_pipeline("org/model") is embedded_pipe
    assert calls == {"name": "org/model", "local_files_only": True}


@pytest.mark.parametrize("spec", ["./no/such/dir", "not a model", 42])
def test_unknown_specs(spec):
    with pytest.raises(difftune.ModelError):
        difftune.load_pipeline(spec)


# ---- hub ids at a revision, single-file checkpoints, dtypes -------------------------------------
#
# A fake Hugging Face cache: the tiny random pipelines of tiny_pipelines.py saved with save_pretrained
# into models--org--name/snapshots/<commit>/, with refs/<branch> naming the commits, exactly the layout
# huggingface_hub resolves offline (the tests check that it does, with try_to_load_from_cache).

COMMIT_MAIN = "0123456789abcdef0123456789abcdef01234567"
COMMIT_DEV = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hf_cache(monkeypatch, tmp_path) -> Path:
    """An empty Hugging Face hub cache in tmp_path, and no network at all (any connection fails the test).

    huggingface_hub reads $HF_HUB_CACHE once, at import, so its module constant is patched as well.
    """
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError(f"load_pipeline tried to reach the network: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    return cache


#: tiny models on a shared 2-core machine: one torch thread (the shared fixture of tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def cache_pipeline(cache: Path, repo_id: str, pipe, commit: str, *branches: str) -> Path:
    """Save ``pipe`` as commit ``commit`` of hub repo ``repo_id`` in ``cache``, pointed at by ``branches``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    pipe.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for branch in branches:
        (repo / "refs" / branch).write_text(commit)  # no newline: huggingface_hub reads the file as is
    return snapshot


def denoiser_fingerprint(pipe) -> str:
    return difftune.describe(pipe).fingerprint


def test_hub_id_loads_from_the_cache_at_a_branch_or_commit(hf_cache):
    from huggingface_hub import try_to_load_from_cache

    main, _ = build("sd", seed=0)
    dev, _ = build("sd", seed=1)
    main_dir = cache_pipeline(hf_cache, "org/name", main, COMMIT_MAIN, "main")
    dev_dir = cache_pipeline(hf_cache, "org/name", dev, COMMIT_DEV, "dev")
    # huggingface_hub itself resolves the fake cache, offline, by branch and by commit
    assert try_to_load_from_cache("org/name", "model_index.json") == str(main_dir / "model_index.json")
    assert try_to_load_from_cache("org/name", "model_index.json", revision="dev") == str(dev_dir / "model_index.json")
    assert try_to_load_from_cache("org/name", "model_index.json", revision=COMMIT_DEV) == str(
        dev_dir / "model_index.json"
    )
    assert difftune.models.is_available_locally("org/name")
    assert difftune.models.is_available_locally("org/name", revision="dev")
    assert difftune.models.is_available_locally("org/name", revision=COMMIT_MAIN)
    assert not difftune.models.is_available_locally("org/name", revision="v2")
    assert not difftune.models.is_available_locally("org/other")

    assert main.unet.state_dict().keys() == dev.unet.state_dict().keys()
    assert denoiser_fingerprint(main) != denoiser_fingerprint(dev)
    loaded = difftune.load_pipeline("org/name")
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert denoiser_fingerprint(loaded) == denoiser_fingerprint(main)
    assert denoiser_fingerprint(difftune.load_pipeline("org/name", revision="main")) == denoiser_fingerprint(main)
    assert denoiser_fingerprint(difftune.load_pipeline("org/name", revision="dev")) == denoiser_fingerprint(dev)
    assert denoiser_fingerprint(difftune.load_pipeline("org/name", revision=COMMIT_DEV)) == denoiser_fingerprint(dev)
    assert denoiser_fingerprint(difftune.load_pipeline("org/name", revision=COMMIT_MAIN)) == denoiser_fingerprint(main)
    assert denoiser_fingerprint(difftune.load_pipeline("org/name@dev")) == denoiser_fingerprint(dev)


def test_uncached_revision_names_the_download_command(hf_cache):
    cache_pipeline(hf_cache, "org/name", build("sd")[0], COMMIT_MAIN, "main")
    with pytest.raises(difftune.ModelError, match=re.escape("`hf download org/name --revision v2`")):
        difftune.load_pipeline("org/name", revision="v2")
    with pytest.raises(difftune.ModelError, match=re.escape("`hf download org/name --revision v2`")):
        difftune.load_pipeline("org/name@v2")
    with pytest.raises(difftune.ModelError, match=re.escape("`hf download org/other`")):
        difftune.load_pipeline("org/other")
    with pytest.raises(difftune.ModelError, match="names revision 'dev' but revision='v2'"):
        difftune.load_pipeline("org/name@dev", revision="v2")


def test_revision_with_a_local_path_is_an_error(tmp_path):
    build("sd")[0].save_pretrained(tmp_path / "pipe")
    with pytest.raises(difftune.ModelError, match="revision='dev' applies to hub ids"):
        difftune.load_pipeline(tmp_path / "pipe", revision="dev")
    with pytest.raises(difftune.ModelError, match="revision='dev' applies to hub ids"):
        difftune.load_pipeline("embedded", revision="dev")


def test_bfloat16_has_the_same_blocks_and_another_fingerprint(embedded_pipe, tmp_path):
    """The fingerprint hashes the weights' dtype and bytes: bf16 weights are other weights."""
    build("sd")[0].save_pretrained(tmp_path / "sd")
    for spec, float32 in (("embedded", embedded_pipe), (tmp_path / "sd", difftune.load_pipeline(tmp_path / "sd"))):
        bf16 = difftune.load_pipeline(spec, torch_dtype=torch.bfloat16)
        info, info32 = difftune.describe(bf16), difftune.describe(float32)
        assert next(getattr(bf16, info.denoiser).parameters()).dtype == torch.bfloat16
        assert (info.family, info.blocks, info.block_info, info.components) == (
            info32.family,
            info32.blocks,
            info32.block_info,
            info32.components,
        )
        assert info.fingerprint != info32.fingerprint
        assert (
            difftune.describe(difftune.load_pipeline(spec, torch_dtype=torch.bfloat16)).fingerprint == info.fingerprint
        )


# ---- single-file checkpoints in the original (CompVis / LDM) Stable Diffusion layout ------------
#
# The inverse of diffusers' convert_ldm_*_checkpoint for a UNet / VAE of any depth, after diffusers'
# scripts/convert_diffusers_to_original_stable_diffusion.py (which hard-codes SD 1.x's four levels).

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _ldm_unet(unet) -> dict[str, torch.Tensor]:
    per = unet.config.layers_per_block + 1  # LDM blocks per level: the resnets, then a down/upsampler slot
    up_attention = {int(k.split(".")[1]) for k in unet.state_dict() if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out = {}
    for key, value in unet.state_dict().items():
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, j = int(m[2]), int(m[4])
            block = f"input_blocks.{per * level + j + 1}" if m[1] == "down" else f"output_blocks.{per * level + j}"
            if m[3] == "resnets":
                module, _, leaf = m[5].partition(".")
                new = f"{block}.0.{_RESNET[module]}.{leaf}"
            else:
                new = f"{block}.1.{m[5]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{per * (int(m[1]) + 1)}.0.op.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            level = int(m[1])
            new = f"output_blocks.{per * level + per - 1}.{2 if level in up_attention else 1}.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_RESNET[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        else:
            module, _, leaf = key.rpartition(".")
            new = f"{_UNET_TOP[module]}.{leaf}"
        out["model.diffusion_model." + new] = value
    return out


def _ldm_vae(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        # the decoder's levels run the other way round in LDM
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", new
        )
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.",
            new,
        )
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if m := re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", new):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def original_sd_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """``pipe``'s UNet, VAE and CLIP text encoder in the key layout of an original SD 1.x ``.ckpt``."""
    text_encoder = {
        "cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
        for k, v in pipe.text_encoder.state_dict().items()
    }
    out = {**_ldm_unet(pipe.unet), **_ldm_vae(pipe.vae), **text_encoder}
    return {k: v.detach().contiguous() for k, v in out.items()}


def assert_same_weights(pipe, loaded, *names: str) -> None:
    for name in names:
        want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name


@pytest.fixture
def sd_single_file(tmp_path):
    """A tiny SD pipeline, its diffusers directory (the configs) and its original-layout .safetensors."""
    pipe, _ = build("sd")
    pipe.save_pretrained(tmp_path / "config")
    save_file(original_sd_checkpoint(pipe), tmp_path / "model.safetensors")
    return pipe, tmp_path / "config", tmp_path / "model.safetensors"


def test_single_file_round_trip_with_a_config_directory(hf_cache, sd_single_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe, config, checkpoint = sd_single_file
    # diffusers' own inference tells an SD checkpoint: no pipeline_class needed
    loaded = difftune.load_pipeline(checkpoint, config=config)
    assert type(loaded) is StableDiffusionPipeline
    assert_same_weights(pipe, loaded, "unet", "vae", "text_encoder")
    assert denoiser_fingerprint(loaded) == denoiser_fingerprint(pipe)
    assert difftune.describe(loaded).blocks == difftune.describe(pipe).blocks
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")} == {
        k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")
    }
    # the same with the class named, and from an original .ckpt (a pickled {"state_dict": ...})
    torch.save({"state_dict": original_sd_checkpoint(pipe)}, tmp_path / "model.ckpt")
    again = difftune.load_pipeline(
        str(tmp_path / "model.ckpt"), pipeline_class="StableDiffusionPipeline", config=str(config)
    )
    assert_same_weights(pipe, again, "unet", "vae", "text_encoder")
    half = difftune.load_pipeline(checkpoint, config=config, torch_dtype=torch.bfloat16)
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == torch.bfloat16


def test_single_file_configs_come_from_the_hf_cache(hf_cache, sd_single_file):
    """Without config=, the configs are those of the hub repo diffusers names for the checkpoint type,
    read from the local cache; config= also takes a cached hub id (at a revision)."""
    pipe, _, checkpoint = sd_single_file
    default_repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(difftune.ModelError, match=re.escape(f"`hf download {default_repo} --include '*.json'")):
        difftune.load_pipeline(checkpoint)
    with pytest.raises(difftune.ModelError, match=re.escape("`hf download org/configs --revision dev --include")):
        difftune.load_pipeline(checkpoint, config="org/configs@dev")

    cache_pipeline(hf_cache, default_repo, pipe, COMMIT_MAIN, "main")
    assert_same_weights(pipe, difftune.load_pipeline(checkpoint), "unet", "vae", "text_encoder")
    cache_pipeline(hf_cache, "org/configs", pipe, COMMIT_DEV, "dev")
    assert_same_weights(pipe, difftune.load_pipeline(checkpoint, config="org/configs@dev"), "unet")


def test_transformer_only_checkpoint_takes_the_other_components_from_config(hf_cache, tmp_path):
    """A file with only the denoiser (here a diffusers-layout Flux transformer, which diffusers' inference
    does not recognise): pipeline_class= says what it is; text encoders and VAE come from config=."""
    from diffusers import FluxPipeline

    pipe, _ = build("flux")
    pipe.save_pretrained(tmp_path / "config")
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, tmp_path / "flux.safetensors")
    with pytest.raises(difftune.ModelError, match=r"cannot tell which pipeline .* pass pipeline_class="):
        difftune.load_pipeline(tmp_path / "flux.safetensors", config=tmp_path / "config")
    loaded = difftune.load_pipeline(
        tmp_path / "flux.safetensors", pipeline_class="FluxPipeline", config=tmp_path / "config"
    )
    assert type(loaded) is FluxPipeline
    assert_same_weights(pipe, loaded, "transformer", "vae", "text_encoder", "text_encoder_2")
    assert denoiser_fingerprint(loaded) == denoiser_fingerprint(pipe)

    # a config folder without weights cannot stand in for what the file lacks
    configs_only = tmp_path / "configs-only"
    for file in (tmp_path / "config").rglob("*"):
        if file.is_file() and file.suffix != ".safetensors":
            (configs_only / file.relative_to(tmp_path / "config")).parent.mkdir(parents=True, exist_ok=True)
            (configs_only / file.relative_to(tmp_path / "config")).write_bytes(file.read_bytes())
    with pytest.raises(difftune.ModelError, match=r"holds no weights for the pipeline's 'text_encoder'.*text_encoder/"):
        difftune.load_pipeline(tmp_path / "flux.safetensors", pipeline_class=FluxPipeline, config=configs_only)


def test_single_file_errors_are_clear(hf_cache, sd_single_file, tmp_path):
    _, config, checkpoint = sd_single_file
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "odd.safetensors")
    cases = [
        ({"spec": tmp_path / "missing.safetensors"}, "no checkpoint file .*missing.safetensors"),
        ({"spec": tmp_path / "odd.safetensors"}, "cannot tell which pipeline .* pass pipeline_class="),
        ({"spec": tmp_path / "odd.safetensors", "pipeline_class": "StableDiffusionPipeline"}, "pass config="),
        (
            {"spec": checkpoint, "pipeline_class": "NoSuchPipeline", "config": config},
            "unknown pipeline class 'NoSuchPipeline'",
        ),
        (
            {"spec": checkpoint, "pipeline_class": "AutoencoderKL", "config": config},
            "unknown pipeline class 'AutoencoderKL'",
        ),
        (
            {"spec": checkpoint, "pipeline_class": "PixArtAlphaPipeline", "config": config},
            "cannot load a PixArtAlphaPipeline from a single-file",
        ),
        ({"spec": checkpoint, "config": tmp_path}, "has no model_index.json"),
        ({"spec": checkpoint, "config": "org/none"}, re.escape("`hf download org/none --include '*.json'")),
        ({"spec": checkpoint, "config": "not a config"}, "neither a local pipeline directory nor a hub id"),
        ({"spec": checkpoint, "config": config, "revision": "dev"}, "applies to hub ids"),
        ({"spec": config, "config": config}, "apply to single-file checkpoints"),
        ({"spec": config, "pipeline_class": "StableDiffusionPipeline"}, "apply to single-file checkpoints"),
    ]
    for kwargs, message in cases:
        with pytest.raises(difftune.ModelError, match=message) as caught:
            difftune.load_pipeline(**kwargs)
        assert "\n" not in str(caught.value), kwargs
    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(difftune.ModelError, match="cannot read the checkpoint"):
        difftune.load_pipeline(tmp_path / "garbage.safetensors", config=config)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(difftune.ModelError, match="not a single-file checkpoint"):
        difftune.load_pipeline(tmp_path / "notes.txt")
    # a checkpoint whose weights do not fit the config's shapes
    other, _ = build("sdxl")
    other.save_pretrained(tmp_path / "sdxl")
    with pytest.raises(difftune.ModelError, match=r"could not load .* as a StableDiffusionPipeline"):
        difftune.load_pipeline(checkpoint, pipeline_class="StableDiffusionPipeline", config=tmp_path / "sdxl")
