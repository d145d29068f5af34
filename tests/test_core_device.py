"""The device manager: validation without torch, resolution on this machine, and that every
setting really changes the model (dtype, quantised weight types, attention processors)."""

import pytest
import torch

from studio.device import DeviceManager, DeviceSettings
from studio.errors import BackendUnavailable, UsageError


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)


@pytest.mark.parametrize("field,value", [("device", "tpu"), ("precision", "fp8"), ("attention", "fast"),
                                         ("offload", "disk"), ("quantize", "int2"), ("device", "cuda:x")])
def test_unknown_values_are_usage_errors_naming_the_choices(field, value):
    with pytest.raises(UsageError) as err:
        DeviceSettings(**{field: value})
    assert value in err.value.message and "|" in err.value.hint


def test_merge_order_env_then_preset_then_flags():
    env = {"STUDIO_PRECISION": "bf16", "STUDIO_ATTENTION": "math"}
    s = DeviceSettings.from_sources(flags={"attention": "flash", "precision": None}, preset={"precision": "fp32"}, env=env)
    assert s.precision == "fp32"  # preset beats the environment
    assert s.attention == "flash"  # a given flag beats everything
    assert DeviceSettings.from_sources(env=env).precision == "bf16"


def test_auto_on_this_cpu_machine_is_cpu_fp32_sdpa_and_says_why():
    dm = DeviceManager(DeviceSettings())
    d = dm.describe()
    assert d["resolved"]["device"] == "cpu" and d["resolved"]["precision"] == "fp32"
    assert d["resolved"]["attention"] == "sdpa"
    assert "no CUDA" in d["reasons"]["device"]


@pytest.mark.parametrize("settings,needle", [
    (dict(device="cuda"), "CUDA"),
    (dict(offload="model"), "offload"),
    (dict(offload="sequential"), "offload"),
    (dict(attention="xformers"), "xformers"),
    (dict(precision="fp16", device="cpu"), "fp16"),
    (dict(quantize="int4"), "int4"),
])
def test_impossible_requests_fail_cleanly_with_a_hint(settings, needle):
    with pytest.raises(BackendUnavailable) as err:
        DeviceManager(DeviceSettings(**settings))
    assert needle in err.value.message and err.value.hint
    assert err.value.exit_code == 2


def test_bf16_precision_casts_the_model():
    unet = DeviceManager(DeviceSettings(precision="bf16")).prepare(tiny_unet())
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}


def test_int8_replaces_linear_weights_with_quantised_tensors_and_still_runs():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(4, 32)
    reference = model(x)
    dm = DeviceManager(DeviceSettings(quantize="int8"))
    model = dm.prepare(model)
    assert "Int8" in type(model[0].weight).__name__
    with dm.inference():
        out = model(x)
    assert out.shape == (4, 8)
    assert torch.allclose(out, reference, atol=0.05)  # weight-only int8 is close, not exact


def test_sliced_attention_swaps_the_processors_of_a_diffusers_pipeline(tiny):
    pytest.importorskip("studio.pipelines.image")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny("sd")))
    before = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    DeviceManager(DeviceSettings(attention="sliced")).prepare(pipe)
    after = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert before == {"AttnProcessor2_0"} and after == {"SlicedAttnProcessor"}


def test_flash_and_math_attention_give_the_same_unet_output():
    unet = tiny_unet().eval()
    x, t, e = torch.randn(1, 4, 8, 8), 1, torch.randn(1, 3, 16)
    outs = {}
    for kind in ("math", "flash"):
        dm = DeviceManager(DeviceSettings(attention=kind))
        dm.prepare(unet)
        with dm.inference():
            outs[kind] = unet(x, t, e).sample
    assert torch.allclose(outs["math"], outs["flash"], atol=1e-5)


def test_transformers_models_get_attention_but_not_diffusers_only_backends():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32))
    DeviceManager(DeviceSettings(attention="flash")).prepare(model)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(BackendUnavailable):
        DeviceManager(DeviceSettings(attention="sliced")).prepare(model)


def test_generator_is_seeded_and_device_independent():
    dm = DeviceManager(DeviceSettings())
    a = torch.randn(4, generator=dm.generator(7))
    b = torch.randn(4, generator=dm.generator(7))
    assert torch.equal(a, b) and not torch.equal(a, torch.randn(4, generator=dm.generator(8)))


# ----------------------------------------------------------------------------- slow choices say so
NO_BF16 = ["fpu", "sse2", "avx2", "avx512f"]  # an AVX-512 CPU from before AVX512-BF16 (e.g. Skylake-X)


def test_cpu_flags_come_from_cpuinfo_or_the_environment():
    from studio.device import native_bf16, read_cpu_flags

    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16\n"
    assert native_bf16(read_cpu_flags(x86, env={})) is True
    assert native_bf16(read_cpu_flags(arm, env={})) is True
    assert native_bf16(read_cpu_flags("flags : fpu sse2 avx2\n", env={})) is False
    assert read_cpu_flags("", env={}) is None and native_bf16(None) is None  # unknown: no claim either way
    assert read_cpu_flags(x86, env={"STUDIO_CPU_FLAGS": "fpu,amx_bf16"}) == {"fpu", "amx_bf16"}


def test_bf16_on_a_cpu_without_native_support_warns_with_the_reason_and_auto_never_picks_it(capsys):
    slow = DeviceManager(DeviceSettings(precision="bf16"), cpu_flags=NO_BF16)
    [warning] = slow.resolved.warnings
    assert "far slower than fp32" in warning and "avx512_bf16" in warning and "--precision fp32" in warning
    assert slow.describe()["warnings"] == [warning]  # recorded in every output's metadata
    assert capsys.readouterr().err == f"warning: {warning}\n"  # one line
    auto = DeviceManager(DeviceSettings(), cpu_flags=NO_BF16)
    assert auto.resolved.precision == "fp32" and not auto.resolved.warnings
    assert "no native bf16" in auto.describe()["reasons"]["precision"]
    fast = DeviceManager(DeviceSettings(precision="bf16"), cpu_flags=NO_BF16 + ["avx512_bf16"])
    assert fast.resolved.precision == "bf16" and not fast.resolved.warnings
    # auto stays fp32 where bf16 is native too (exact outputs), and says bf16 is there for speed
    auto_fast = DeviceManager(DeviceSettings(), cpu_flags=["amx_bf16"])
    assert auto_fast.resolved.precision == "fp32" and "--precision bf16" in auto_fast.describe()["reasons"]["precision"]


def test_math_attention_warns_that_it_skips_the_fused_kernel(capsys):
    dm = DeviceManager(DeviceSettings(attention="math"), cpu_flags=NO_BF16)
    [warning] = dm.resolved.warnings
    assert "--attention math" in warning and "sdpa" in warning
    assert not DeviceManager(DeviceSettings(), cpu_flags=NO_BF16).resolved.warnings


def test_the_cli_prints_the_bf16_warning_once_and_records_it(cli, tiny, monkeypatch):
    import json
    from pathlib import Path

    monkeypatch.setenv("STUDIO_CPU_FLAGS", " ".join(NO_BF16))
    said = []
    for out in ("a", "b"):  # the second run reuses the process's device manager: no second line
        r = cli("image", "a red cat", "--model", tiny("sd"), "--precision", "bf16", "--steps", "1",
                "--width", "32", "--height", "32", "--seed", "1", "-o", out)
        assert r.exit_code == 0, r
        said.append([line for line in r.stderr.splitlines() if line.startswith("warning:")])
    [[warning], again] = said
    assert "--precision bf16 runs far slower than fp32" in warning and again == []
    [sidecar] = Path("a").glob("*.json")
    device = json.loads(sidecar.read_text())["device"]
    assert device["resolved"]["precision"] == "bf16" and "avx512_bf16" in device["warnings"][0]
