"""ONNX export (verified with ONNX Runtime) and the `sr --backend onnxruntime` path.

Needs the `onnx` extra (onnx, onnxruntime, onnxscript), which requirements-cpu.txt installs.
"""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import REPO
from PIL import Image
from safetensors.torch import save_file

from edsr_dist.cli import main as cli_main
from edsr_dist.data.images import to_uint8
from edsr_dist.data.sample_store import load_sample_image
from edsr_dist.errors import UserError
from edsr_dist.inference.onnx_export import OPSET, VERIFY_SIZES, export_onnx
from edsr_dist.inference.onnx_runtime import OnnxModel, super_resolve_onnx
from edsr_dist.inference.torch_runtime import receptive_field_radius, super_resolve
from edsr_dist.inference.weights import model_from_weights
from edsr_dist.model.edsr import EDSR

PHOTO = load_sample_image("astronaut")  # not the export's own check image


def _model(scale, blocks, filters, res_scale, seed=0):
    torch.manual_seed(seed)
    model = EDSR(scale=scale, num_blocks=blocks, num_filters=filters, res_scale=res_scale)
    with torch.no_grad():  # default bias init is tiny; make every parameter matter
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


def _within_one(got: np.ndarray, want: np.ndarray) -> float:
    return float((np.abs(to_uint8(got).astype(int) - to_uint8(want).astype(int)) <= 1).mean())


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_baseline_export_matches_pytorch_at_dynamic_shapes(tmp_path, scale):
    model = _model(scale, blocks=16, filters=64, res_scale=1.0)
    out = tmp_path / "model.onnx"
    sizes = VERIFY_SIZES if scale == 2 else ((12, 16), (11, 13))  # the default check once, smaller ones after
    checks = export_onnx(model, out, load_sample_image("chelsea"), sizes=sizes)
    assert [(c.batch, c.height, c.width) for c in checks] == [(2, *sizes[0])] + [(1, *s) for s in sizes[1:]]
    assert all(c.within_one >= 0.999 for c in checks)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]

    graph = onnx.load(str(out))
    assert graph.opset_import[0].version == OPSET == 13
    assert [i.name for i in graph.graph.input] == ["lr"] and [o.name for o in graph.graph.output] == ["sr"]
    assert _dims(graph.graph.input[0]) == ["batch", 3, "height", "width"]
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["scale"] == str(scale) and meta["receptive_field_radius"] == str(receptive_field_radius(model))

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch, height, width in ((1, 19, 33), (3, 24, 17)):
        lr = np.ascontiguousarray(PHOTO[100:100 + height, 200:200 + width].transpose(2, 0, 1)[None]
                                  .repeat(batch, 0), dtype=np.float32)
        lr[1:] = np.flip(lr[1:], -1)  # the batch items differ
        got = session.run(["sr"], {"lr": lr})[0]
        with torch.inference_mode():
            want = model(torch.from_numpy(lr)).numpy()
        assert got.shape == (batch, 3, height * scale, width * scale)
        for item in range(batch):
            assert _within_one(got[item], want[item]) >= 0.999


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_paper_shaped_export_verifies_at_a_small_size(tmp_path, scale):
    model = _model(scale, blocks=32, filters=256, res_scale=0.1)
    out = tmp_path / "paper.onnx"
    checks = export_onnx(model, out, load_sample_image("chelsea"), sizes=((6, 8), (5, 7)))
    assert [c.batch for c in checks] == [2, 1] and all(c.within_one >= 0.999 for c in checks)
    assert out.stat().st_size > 4 * 40e6  # ~40M float32 parameters, all inside the one file
    assert sorted(os.listdir(tmp_path)) == ["paper.onnx"]


def test_fp16_variant_keeps_the_float32_interface(tmp_path):
    model = _model(2, blocks=4, filters=32, res_scale=1.0)
    out = tmp_path / "half.onnx"
    checks = export_onnx(model, out, load_sample_image("chelsea"), precision="fp16")
    assert all(c.within_one >= 0.99 for c in checks)
    graph = onnx.load(str(out))
    kernels = [t for t in graph.graph.initializer if len(t.dims) == 4]
    assert kernels and all(t.data_type == onnx.TensorProto.FLOAT16 for t in kernels)
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_opset_18_goes_through_the_torch_export_exporter(tmp_path):
    model = _model(3, blocks=2, filters=16, res_scale=1.0)
    out = tmp_path / "m18.onnx"
    export_onnx(model, out, load_sample_image("chelsea"), opset=18)
    graph = onnx.load(str(out))
    assert graph.opset_import[0].version == 18
    assert _dims(graph.graph.input[0])[1] == 3 and isinstance(_dims(graph.graph.input[0])[2], str)


class ShapeBaked(EDSR):
    """Adds a constant the tracer bakes in from the example input's width: wrong at every other width."""

    def forward(self, x):
        return super().forward(x) + float(int(x.shape[-1]) % 7 * 3)


def test_failed_verification_writes_nothing_and_keeps_the_old_file(tmp_path):
    torch.manual_seed(0)
    model = ShapeBaked(scale=2, num_blocks=1, num_filters=8, res_scale=1.0).eval()
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    (tmp_path / "other.txt").write_text("keep me")
    with pytest.raises(UserError) as info:
        export_onnx(model, out, load_sample_image("chelsea"))
    message = str(info.value)
    assert "verification failed" in message and "\n" not in message and "was not written" in message
    assert out.read_bytes() == b"the previous export"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "other.txt"]


def _weights(tmp_path, scale=2):
    path = tmp_path / f"w_x{scale}.safetensors"
    save_file(_model(scale, blocks=2, filters=16, res_scale=1.0).state_dict(), str(path))
    return path


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_export_command_and_its_user_errors(tmp_path, capsys):
    weights = _weights(tmp_path)
    out = tmp_path / "exports" / "m.model"
    assert cli_main(["export", "--checkpoint", str(weights), "--out", str(out), "--format", "onnx",
                     "--verify-sizes", "12x17,9x8"]) == 0
    printed = capsys.readouterr().out
    assert "2x3x12x17: 100" in printed and "1x3x9x8:" in printed and f"wrote {out}" in printed
    assert onnx.load(str(out)).graph.output[0].name == "sr"

    assert cli_main(["export", "--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "a.onnx")]) == 2
    _one_line_error(capsys, "missing.ckpt does not exist")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli_main(["export", "--checkpoint", str(weights), "--out", str(blocker / "m.onnx")]) == 2
    _one_line_error(capsys, "cannot create folder")
    assert cli_main(["export", "--checkpoint", str(weights), "--out", str(tmp_path / "m.tflite")]) == 2
    _one_line_error(capsys, "unknown weights format .tflite")
    assert cli_main(["export", "--checkpoint", str(weights), "--out", str(tmp_path / "m.onnx"), "--format", "keras"]) == 2
    _one_line_error(capsys, "invalid choice: 'keras'")
    assert cli_main(["export", "--checkpoint", str(weights), "--out", str(tmp_path / "m.pt"), "--format", "onnx"]) == 2
    _one_line_error(capsys, "make them agree")
    assert cli_main(["export", "--checkpoint", str(weights), "--out", str(tmp_path / "m.pt"), "--opset", "13"]) == 2
    _one_line_error(capsys, "only ONNX exports take --opset")
    assert cli_main(["export", "--checkpoint", str(weights), "--out", str(tmp_path / "m.onnx"), "--opset", "9"]) == 2
    _one_line_error(capsys, "opset 9 is not supported")
    assert cli_main(["export", "--checkpoint", str(weights), "--out", str(tmp_path / "m.onnx"),
                     "--verify-sizes", "12by17"]) == 2
    _one_line_error(capsys, "--verify-sizes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "exports", weights.name]


def test_sr_onnxruntime_backend_matches_pytorch_and_needs_no_torch(tmp_path, capsys):
    weights = _weights(tmp_path, scale=3)
    model_path = tmp_path / "m.onnx"
    assert cli_main(["export", "--checkpoint", str(weights), "--out", str(model_path), "--verify-sizes", "8x8"]) == 0
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(PHOTO[50:87, 60:101]).save(images / "odd.png")  # 41x37
    for backend, checkpoint in (("pytorch", weights), ("onnxruntime", model_path)):
        assert cli_main(["sr", str(images), "--checkpoint", str(checkpoint), "--out", str(tmp_path / backend),
                         "--backend", backend, "--tile", "16", "--self-ensemble", "--device", "cpu"]) == 0
    by_torch = np.asarray(Image.open(tmp_path / "pytorch" / "odd_x3.png")).astype(int)
    by_ort = np.asarray(Image.open(tmp_path / "onnxruntime" / "odd_x3.png")).astype(int)
    assert by_ort.shape == (111, 123, 3)
    assert (np.abs(by_ort - by_torch) <= 1).mean() >= 0.999

    torch_model, _ = model_from_weights(weights)
    session = OnnxModel(model_path, device="cpu")
    lr = PHOTO[:29, :35]
    whole = super_resolve_onnx(session, lr, tile=0)
    assert np.abs(super_resolve_onnx(session, lr, tile=10).astype(int) - whole).max() <= 1  # tiles are exact
    assert np.abs(whole.astype(int) - super_resolve(torch_model, lr, "cpu")).max() <= 1

    # torch made unimportable: the onnxruntime backend still serves
    script = ("import sys; sys.modules['torch'] = None\n"
              "from edsr_dist.cli import main\n"
              f"sys.exit(main(['sr', {str(images)!r}, '--checkpoint', {str(model_path)!r}, '--out', "
              f"{str(tmp_path / 'no_torch')!r}, '--backend', 'onnxruntime', '--tile', '16', '--self-ensemble']))")
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    no_torch = np.asarray(Image.open(tmp_path / "no_torch" / "odd_x3.png")).astype(int)
    assert np.array_equal(no_torch, by_ort)

    capsys.readouterr()
    assert cli_main(["sr", str(images), "--checkpoint", str(weights), "--out", str(tmp_path / "x"),
                     "--backend", "onnxruntime"]) == 2
    _one_line_error(capsys, "runs an exported .onnx model")
    assert cli_main(["sr", str(images), "--checkpoint", str(model_path), "--out", str(tmp_path / "x")]) == 2
    _one_line_error(capsys, "pass --backend onnxruntime")
    assert cli_main(["sr", str(images), "--checkpoint", str(model_path), "--out", str(tmp_path / "x"),
                     "--backend", "onnxruntime", "--precision", "bf16"]) == 2
    _one_line_error(capsys, "export an fp16 model")


def test_bench_sr_reports_both_backends_on_the_same_images(tmp_path, capsys):
    Image.fromarray(PHOTO[:20, :30]).save(tmp_path / "a.png")
    Image.fromarray(PHOTO[40:53, 40:61]).save(tmp_path / "b.png")
    threads_before = torch.get_num_threads()
    assert cli_main(["bench-sr", str(tmp_path), "--num-blocks", "1", "--num-filters", "8", "--scale", "3",
                     "--repeat", "2", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert torch.get_num_threads() == threads_before
    assert report["images"] == [f"{tmp_path / 'a.png'} 30x20", f"{tmp_path / 'b.png'} 21x13"]
    assert report["threads"] == 1 and report["scale"] == 3
    # sr's default: ONNX Runtime on the verified export its cache made (timed), found again on the second call
    assert report["default_backend"] == "onnxruntime (cached verified export)"
    assert report["first_call_export_s"] > report["cached_call_s"] > 0
    assert report["default_vs_fastest_fp32"] == pytest.approx(
        max(report["results"][n]["images_per_s"] for n in ("pytorch", "onnxruntime", "pytorch_eager"))
        / report["results"]["default"]["images_per_s"])
    for backend in ("default", "pytorch", "onnxruntime"):
        result = report["results"][backend]
        assert len(result["pass_seconds"]) == 2
        assert result["images_per_s"] == pytest.approx(2 / min(result["pass_seconds"]))
        assert result["sr_megapixels_per_s"] == pytest.approx((600 + 273) * 9 / 1e6 / min(result["pass_seconds"]))


def test_sr_keeps_alpha_and_grayscale_on_both_backends(tmp_path, capsys):
    """RGBA and LA come out with their alpha (bicubic-resized), L stays L, palettes are expanded; the output line
    says what was done. The network part is the same RGB upscale as for a plain RGB input."""
    weights = _weights(tmp_path, scale=2)
    model_path = tmp_path / "m.onnx"
    assert cli_main(["export", "--checkpoint", str(weights), "--out", str(model_path), "--verify-sizes", "8x8"]) == 0
    rgb = PHOTO[100:121, 200:223]  # 23x21
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    alpha[:5] = 0  # a fully transparent band
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(np.dstack([rgb, alpha])).save(images / "rgba.png")
    Image.fromarray(np.dstack([rgb[..., 1], alpha])).save(images / "la.png")
    Image.fromarray(rgb[..., 1]).save(images / "gray.png")
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(images / "pal.png")
    palette.save(images / "pal_t.png", transparency=0)
    want_alpha = np.asarray(Image.fromarray(alpha).resize((46, 42), Image.Resampling.BICUBIC)).astype(int)
    torch_model, _ = model_from_weights(weights)
    for backend, checkpoint in (("pytorch", weights), ("onnxruntime", model_path)):
        capsys.readouterr()
        assert cli_main(["sr", str(images), "--checkpoint", str(checkpoint), "--out", str(tmp_path / backend),
                         "--backend", backend, "--device", "cpu"]) == 0
        lines = {line.split(" ")[0].rsplit("/", 1)[-1]: line for line in capsys.readouterr().out.splitlines()}
        outs = {name: Image.open(tmp_path / backend / f"{name}_x2.png") for name in ("rgba", "la", "gray", "pal", "pal_t")}
        assert {name: im.mode for name, im in outs.items()} == {
            "rgba": "RGBA", "la": "LA", "gray": "L", "pal": "RGB", "pal_t": "RGBA"}
        assert all(im.size == (46, 42) for im in outs.values())
        assert np.abs(np.asarray(outs["rgba"].getchannel("A")).astype(int) - want_alpha).max() == 0
        assert np.abs(np.asarray(outs["la"].getchannel("A")).astype(int) - want_alpha).max() == 0
        sr_rgb = super_resolve(torch_model, rgb, "cpu").astype(int)
        assert np.abs(np.asarray(outs["rgba"])[..., :3].astype(int) - sr_rgb).max() <= 1
        gray_in = np.repeat(rgb[..., 1:2], 3, axis=2)
        want_gray = np.asarray(Image.fromarray(super_resolve(torch_model, gray_in, "cpu")).convert("L")).astype(int)
        assert np.abs(np.asarray(outs["gray"]).astype(int) - want_gray).max() <= 1
        pal_alpha = Image.open(images / "pal_t.png").convert("RGBA").getchannel("A")
        assert 0 < (np.asarray(pal_alpha) == 0).mean() < 1  # palette entry 0 is transparent, the rest opaque
        assert outs["pal_t"].getchannel("A").tobytes() == pal_alpha.resize((46, 42), Image.Resampling.BICUBIC).tobytes()
        assert lines["rgba.png"].endswith("; alpha upscaled by bicubic") and "(46x42 RGBA)" in lines["rgba.png"]
        assert lines["gray.png"].endswith("; grayscale in, grayscale out") and "(46x42 L)" in lines["gray.png"]
        assert lines["la.png"].endswith("; grayscale in, grayscale out, alpha upscaled by bicubic")
        assert lines["pal.png"].endswith("; palette expanded")
        assert lines["pal_t.png"].endswith("; palette expanded, alpha upscaled by bicubic")
