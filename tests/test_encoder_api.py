"""Public API, presets, checkpoints and bad input."""

import pytest
import torch
from conftest import tiny_encoder
from safetensors.torch import save_file

import hirespath
from hirespath.models.backbones import ResolutionError, build_timm_model, check_resolution, get_backbone


def test_presets_registered():
    names = hirespath.list_backbones()
    for n in ["uni2_h", "uni", "virchow2", "h_optimus_0", "prov_gigapath", "tiny"]:
        assert n in names
    p = get_backbone("uni2_h")
    assert p.patch_size == 14 and p.num_prefix_tokens == 9 and p.checkpoint == "MahmoodLab/UNI2-h"


@pytest.mark.parametrize("name", ["uni2_h", "uni", "virchow2", "h_optimus_0", "prov_gigapath"])
def test_presets_build_their_architecture(name):
    """Each preset builds on the meta device (no memory) with its patch size and prefix-token count."""
    preset = get_backbone(name)
    with torch.device("meta"):
        vit = build_timm_model(preset)
    assert vit.patch_embed.patch_size[0] == preset.patch_size
    assert vit.num_prefix_tokens == preset.num_prefix_tokens
    assert vit.dynamic_img_size
    # timm's own data config normalises as the model card says (H-optimus-0 has its own mean/std)
    assert vit.pretrained_cfg["mean"] == preset.mean and vit.pretrained_cfg["std"] == preset.std


def test_uni2_h_is_exactly_uni2_h():
    with torch.device("meta"):
        vit = build_timm_model(get_backbone("uni2_h"))
    n = sum(p.numel() for p in vit.parameters())
    assert 680e6 < n < 682e6  # 681 M parameters
    assert vit.embed_dim == 1536 and len(vit.blocks) == 24 and vit.blocks[0].attn.num_heads == 24


def test_any_input_size_interpolates_position_embeddings():
    enc = tiny_encoder(attention="dense")
    with torch.no_grad():
        for h, w in [(224, 224), (14 * 3, 14 * 20), (14 * 33, 14 * 2)]:
            out = enc(torch.randn(1, 3, h, w))
            assert out.grid == (h // 14, w // 14)
            assert out.patch_tokens.shape[1] == (h // 14) * (w // 14)


def test_checkpoint_round_trip(tmp_path):
    src = tiny_encoder(attention="dense")
    x = torch.randn(1, 3, 56, 56)
    for suffix in (".safetensors", ".pth", ".bin"):
        path = tmp_path / f"model{suffix}"
        state = {k: v.clone().contiguous() for k, v in src.vit.state_dict().items()}
        if suffix == ".safetensors":
            save_file(state, str(path))
        else:
            torch.save(state, path)
        torch.manual_seed(123)  # different random init: the file must overwrite every weight
        enc = hirespath.create_encoder("tiny", attention="dense", weights=str(path), init_values=1.0).eval()
        with torch.no_grad():
            torch.testing.assert_close(enc(x).cls, src(x).cls)
        assert set(enc.vit.state_dict()) == set(state)  # official key layout, untouched


def test_weights_file_skips_the_random_init_and_keeps_dtypes(tmp_path, monkeypatch):
    """Given a weights file the ViT is built on the meta device and takes the file's tensors (UNI2-h's random init
    is seconds per process); an fp16 file still gives fp32 weights, and a model with a tensor the file cannot hold
    (a non-persistent buffer, a plain tensor attribute) is built the usual way."""
    import timm

    src = tiny_encoder(attention="dense")
    state = dict(src.vit.state_dict())
    path = tmp_path / "half.safetensors"
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(path))
    create, built, extra = timm.create_model, [], {}

    def recording(*args, **kwargs):
        built.append(torch.empty(0).device.type)  # the device the model's tensors are made on
        model = create(*args, **kwargs)
        for name, value in extra.items():  # a non-persistent buffer, or a tensor kept as a plain attribute
            if name.startswith("buffer"):
                model.register_buffer(name, value.to(torch.empty(0).device), persistent=False)
            else:
                setattr(model.blocks[0], name, value.to(torch.empty(0).device))
        return model

    monkeypatch.setattr(timm, "create_model", recording)
    vit = build_timm_model(get_backbone("tiny"), weights=str(path), init_values=1.0)
    assert built == ["meta"]  # no random weights were made
    with torch.device("meta"):  # built where the caller builds, as before
        assert build_timm_model(get_backbone("tiny"), weights=str(path), init_values=1.0).pos_embed.is_meta
    built.clear()
    loaded = vit.state_dict()
    assert not any(t.is_meta for t in loaded.values()) and {t.dtype for t in loaded.values()} == {torch.float32}
    for k, v in state.items():
        torch.testing.assert_close(loaded[k], v.half().float(), rtol=0, atol=0)
    # the weights are the model's own memory, not a map of the file: rewriting the file does not change them
    fp32 = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(fp32))
    vit32 = build_timm_model(get_backbone("tiny"), weights=str(fp32), init_values=1.0)
    with open(fp32, "r+b") as f:
        f.seek(-(fp32.stat().st_size // 2), 2)
        f.write(b"\x7f" * (fp32.stat().st_size // 2))
    assert all(torch.equal(vit32.state_dict()[k], v) for k, v in state.items())
    built.clear()

    for name in ("buffer_table", "table"):
        built.clear()
        extra.clear()
        extra[name] = torch.full((3,), 2.0)
        vit = build_timm_model(get_backbone("tiny"), weights=str(path), init_values=1.0)
        kept = getattr(vit, name) if name.startswith("buffer") else vit.blocks[0].table
        assert built == ["meta", "cpu"] and torch.equal(kept, torch.full((3,), 2.0))
        torch.testing.assert_close(vit.state_dict()["pos_embed"], state["pos_embed"].half().float(), rtol=0, atol=0)


def test_a_tensor_saved_under_two_keys_is_converted_once():
    """A segment checkpoint saves the ViT-Adapter's modules twice (under the adapter, and inside the Mask2Former
    model): converted per key, each copy was made twice (a UNI2-h checkpoint's load peaked at 9.35 GB, not 6.6)."""
    from hirespath.models.backbones import assignable_state

    shared, other = torch.randn(4, 3), torch.randn(2)
    state = {"adapter.w": shared, "m2f.adapter.w": shared, "b": other, "unexpected": other}
    own = {"adapter.w": torch.empty(4, 3), "m2f.adapter.w": torch.empty(4, 3), "b": torch.empty(2, dtype=torch.half)}
    out = assignable_state(state, own, copy=True)
    assert out["adapter.w"] is out["m2f.adapter.w"] and out["adapter.w"].data_ptr() != shared.data_ptr()
    assert torch.equal(out["adapter.w"], shared) and out["b"].dtype == torch.half and out["unexpected"] is other


def test_wrong_checkpoint_lists_keys(tmp_path):
    src = tiny_encoder(attention="dense")
    state = dict(src.vit.state_dict())
    state.pop("reg_token")
    state["head.weight"] = torch.zeros(2, 96)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        hirespath.create_encoder("tiny", weights=str(path))
    msg = str(err.value)
    assert "reg_token" in msg and "head.weight" in msg and "bad.pth" in msg


def test_shape_mismatch_is_reported(tmp_path):
    state = tiny_encoder(attention="dense").vit.state_dict()
    path = tmp_path / "deeper.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="shape mismatch|missing keys|unexpected keys"):
        hirespath.create_encoder("tiny", weights=str(path), embed_dim=192)


def test_hub_weights_explain_how_to_pass_a_file():
    with pytest.raises(ValueError, match="never downloads.*MahmoodLab/UNI2-h.*weights="):
        hirespath.create_encoder("uni2_h", weights="hf_hub:MahmoodLab/UNI2-h")
    with pytest.raises(ValueError, match="never downloads"):
        hirespath.create_encoder("tiny", pretrained=True)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        hirespath.create_encoder("tiny", weights="/nope.safetensors")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"module." + k: v for k, v in sd.items()},  # DDP
        lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 1},  # Lightning
        lambda sd: {"teacher": {"backbone." + k: v for k, v in sd.items()}},  # DINOv2 training
        lambda sd: {"vit." + k: v for k, v in sd.items()},  # HiResEncoder.state_dict()
    ],
)
def test_checkpoints_saved_from_a_wrapper_load(tmp_path, wrap):
    src = tiny_encoder(attention="dense")
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(dict(src.vit.state_dict())), path)
    torch.manual_seed(123)
    enc = hirespath.create_encoder("tiny", attention="dense", weights=str(path), init_values=1.0).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(enc(x).cls, src(x).cls)


def test_weights_given_as_a_directory_hub_id_or_empty(tmp_path):
    src = tiny_encoder(attention="dense")
    torch.save(dict(src.vit.state_dict()), tmp_path / "pytorch_model.bin")  # the model card's local_dir
    enc = hirespath.create_encoder("tiny", attention="dense", weights=str(tmp_path), init_values=1.0).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(enc(x).cls, src(x).cls)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="is a directory without any of"):
        hirespath.create_encoder("tiny", weights=str(tmp_path))
    with pytest.raises(ValueError, match="never downloads.*huggingface.co/MahmoodLab/UNI2-h"):
        hirespath.create_encoder("uni2_h", weights="MahmoodLab/UNI2-h")
    # a relative path to a file that is not there is not a hub id (it was told "hf-hub:UNI2-h/...")
    with pytest.raises(FileNotFoundError, match=r"'UNI2-h/pytorch_model.bin' does not exist \(relative to "):
        hirespath.create_encoder("tiny", weights="UNI2-h/pytorch_model.bin")
    with pytest.raises(ValueError, match="is empty"):
        hirespath.create_encoder("tiny", weights="")


def test_checkpoint_of_another_preset_is_named(tmp_path, monkeypatch):
    """Full-size shapes on the meta device: UNI's file given to the uni2_h preset."""
    import timm

    from hirespath.models import backbones

    uni = backbones.get_backbone("uni")
    with torch.device("meta"):
        uni_state = timm.create_model(uni.timm_name, pretrained=False, **uni.kwargs).state_dict()
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"")
    monkeypatch.setattr(backbones, "read_state_dict", lambda _: uni_state)
    with pytest.raises(ValueError) as err, torch.device("meta"):
        hirespath.create_encoder("uni2_h", weights=str(path))
    msg = str(err.value)
    assert "checkpoint of preset 'uni'" in msg and len(msg) < 2000  # short lists, not every key
    assert "set backbone=uni" in msg  # the hint is the Hydra override a task user types


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=0), "window must be an integer >= 1"),
        (dict(prune_ratio=1.0), r"prune ratio must be in \[0, 1\)"),
        (dict(prune_ratio=-0.1), r"prune ratio must be in \[0, 1\)"),
        (dict(prune_ratio=0.5, prune_layer=0), r"prune layer must be in \[1, 5\]"),
        (dict(prune_ratio=0.5, prune_layer=6), r"prune layer must be in \[1, 5\]"),
        (dict(attention="flash"), "attention must be one of"),
        (dict(prune_ratio=0.5, prune_score_tokens="regs"), "score_tokens"),
    ],
)
def test_bad_construction_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hirespath.create_encoder("tiny", **kwargs)


def test_unknown_preset_names_choices():
    with pytest.raises(ValueError, match="unknown backbone preset 'uni3'.*uni2_h"):
        hirespath.create_encoder("uni3")


def test_bad_images():
    enc = tiny_encoder()
    with pytest.raises(
        ValueError,
        match=r"image size 230×224 is not a positive multiple of the patch size 14; nearest valid: H 224 or 238 "
        r"\(resize or crop, or build the encoder with resize_input=True\)",
    ):
        enc(torch.randn(1, 3, 230, 224))
    with pytest.raises(ValueError, match=r"nearest valid: H 224 or 238, W 98 or 112"):
        enc(torch.randn(1, 3, 230, 100))
    with pytest.raises(TypeError, match="float tensor"):
        enc(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"B×3×H×W"):
        enc(torch.randn(1, 4, 28, 28))
    with pytest.raises(ValueError, match=r"B×3×H×W"):
        enc(torch.randn(3, 28, 28))
    resizing = tiny_encoder(resize_input=True)
    with torch.no_grad():
        assert resizing(torch.randn(1, 3, 230, 220)).grid == (16, 16)


def test_hydra_config_instantiates_the_same_encoder():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose(
            "benchmark",
            overrides=[
                "backbone=tiny",
                "attention=sparse",
                "attention.window=3",
                "attention.radius=2",
                "attention.sparse_backend=gather",
                "pruner=global_attention",
                "pruner.prune_ratio=0.5",
                "pruner.prune_layer=2",
                "pruner.prune_score_tokens=all",
            ],
        )
    torch.manual_seed(0)
    enc = instantiate(cfg.encoder).eval()
    kwargs = dict(window=3, radius=2, sparse_backend="gather", prune_ratio=0.5, prune_layer=2, prune_score_tokens="all")
    ref = tiny_encoder(attention="sparse", **kwargs)
    assert isinstance(enc, hirespath.HiResEncoder)
    assert (enc.attention, enc.window, enc.radius, enc.sparse_backend) == ("sparse", 3, 2, "gather")
    assert (enc.pruner.ratio, enc.pruner.layer, enc.pruner.score_tokens) == (0.5, 2, "all")
    assert enc.vit.blocks[0].ls1.gamma.eq(1.0).all()  # backbone.overrides (tiny.yaml: init_values 1.0) reach timm
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        torch.testing.assert_close(enc(x).cls, ref(x).cls)


def test_training_backward_through_sparse():
    enc = tiny_encoder(attention="sparse", window=2, depth=2).train()
    out = enc(torch.randn(2, 3, 56, 70))
    (out.patch_tokens.square().mean() + out.cls.mean()).backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:5])
    assert enc.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_mlp_chunking_in_inference_is_exact():
    enc = tiny_encoder(attention="sparse", window=2)
    x = torch.randn(2, 3, 14 * 6, 14 * 6)  # batch > 1: chunks slice the token dimension
    with torch.no_grad():
        whole = enc(x)
        enc.mlp_chunk = 7
        chunked = enc(x)
    torch.testing.assert_close(chunked.patch_tokens, whole.patch_tokens, atol=1e-5, rtol=1e-5)


NOT_MULTIPLE = "is not a positive multiple of the patch size"


@pytest.mark.parametrize(
    "args, message, nearest",
    [
        ((100, 14), f"resolution 100 {NOT_MULTIPLE} 14; nearest valid: 98 or 112", (98, 112)),
        ((300, 16, "resolutions[1]"), f"resolutions[1] 300 {NOT_MULTIPLE} 16; nearest valid: 288 or 304", (288, 304)),
        ((7, 14), f"resolution 7 {NOT_MULTIPLE} 14; nearest valid: 14 or 28", (14, 28)),
        ((0, 14), f"resolution 0 {NOT_MULTIPLE} 14; nearest valid: 14 or 28", (14, 28)),
        (
            ((230, 224), 14, "image size", "resize"),
            f"image size 230×224 {NOT_MULTIPLE} 14; nearest valid: H 224 or 238 (resize)",
            ((224, 238), (224, 238)),
        ),
        (
            ((224, 100), 14, "image size"),
            f"image size 224×100 {NOT_MULTIPLE} 14; nearest valid: W 98 or 112",
            ((224, 238), (98, 112)),
        ),
        (((230, 100), 14), "nearest valid: H 224 or 238, W 98 or 112", ((224, 238), (98, 112))),
    ],
)
def test_check_resolution_names_size_patch_and_nearest(args, message, nearest):
    with pytest.raises(ResolutionError) as err:
        check_resolution(*args)
    assert isinstance(err.value, ValueError)
    assert message in str(err.value)
    assert err.value.nearest == nearest


def test_check_resolution_accepts_multiples_and_refuses_non_integers():
    check_resolution(224, 14)
    check_resolution(14, 14)
    check_resolution((224, 98), 14)
    for bad in (224.0, "224", True, (224,), (224, 224, 224), (224, 22.5)):
        with pytest.raises(ValueError, match="integer number of pixels"):
            check_resolution(bad, 14)


def test_a_narrowing_timm_cannot_build_is_named_not_a_bare_assertion():
    """UNI2-h's gated (SwiGLU) MLP needs an even hidden size: embed_dim=64 gave timm's AssertionError() with no
    message (through Hydra: "Error in call to target ... AssertionError()")."""
    with pytest.raises(ValueError, match=r"timm cannot build uni2_h .*overrides.embed_dim must make that even"):
        hirespath.create_encoder("uni2_h", attention="dense", depth=1, embed_dim=64, num_heads=2)
    assert hirespath.create_encoder("uni2_h", attention="dense", depth=1, embed_dim=96, num_heads=2).embed_dim == 96
