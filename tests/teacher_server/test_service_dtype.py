"""`--dtype auto` and the start-up fidelity check: the choice forced both ways, GetModelInfo's dtype, the metric,
the refusal below `--min-dtype-agreement`, and a bill that does not depend on the dtype (ledger read back with SQL)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from service_testkit import auth, ledger_rows, logits_of, patch_request, patches_of, random_images, random_keep, \
    settings, stub, tiny_vit

from maskedkd.precision import CPU_BF16_MIN_SPEEDUP, FORCE_CPU_BF16_ENV, cpu_bf16_support, \
    measured_cpu_bf16_speedup, resolve_dtype, resolve_precision
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.cli import main as teacher_cli
from teacher_server.settings import ServerSettings
from teacher_server.testing import running_server


def _cpuinfo_has_bf16() -> bool:
    text = Path("/proc/cpuinfo").read_text()
    return " avx512_bf16" in text or " amx_bf16" in text


@pytest.mark.parametrize("forced,expected", [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_follows_the_forced_cpu_answer(monkeypatch: pytest.MonkeyPatch, forced: str,
                                            expected: torch.dtype) -> None:
    monkeypatch.setenv(FORCE_CPU_BF16_ENV, forced)
    assert resolve_dtype("auto", "cpu")[0] == expected
    assert resolve_precision("auto", "cpu") == ("bf16" if forced == "1" else "fp32")
    assert resolve_dtype("float16", "cpu")[0] == torch.float16  # an explicit choice is never overridden
    assert resolve_precision("fp32", "cpu") == "fp32"


def test_detection_reads_the_cpu_flags_then_measures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FORCE_CPU_BF16_ENV, raising=False)
    native, why = cpu_bf16_support()
    if _cpuinfo_has_bf16():  # flags are not enough: bf16 must also measure faster (the same cached measurement)
        speedup = measured_cpu_bf16_speedup()
        assert speedup > 0 and native == (speedup >= CPU_BF16_MIN_SPEEDUP), why
        assert f"measured bf16 matmul {speedup:.2f}x fp32" in why
    else:
        assert not native and "measured" not in why, why
    assert ServerSettings().dtype == "auto"


def test_dtype_is_resolved_reported_exported_and_never_billed(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_vit()
    images, keep = random_images(4, seed=3), random_keep(4, 24, seed=4)
    usage, logits, info, metric = {}, {}, {}, {}
    for forced, name in (("0", "float32"), ("1", "bfloat16")):
        monkeypatch.setenv(FORCE_CPU_BF16_ENV, forced)
        db = tmp_path / name
        db.mkdir()
        with running_server(settings(db, dtype="auto"), model=model) as srv:
            key = srv.create_key("k")
            channel, client = stub(srv.address)
            with channel:
                info[name] = client.GetModelInfo(pb.ModelInfoRequest()).dtype
                r = client.Infer(patch_request(patches_of(images, keep), keep, request_id="same"),
                                 metadata=auth(key))
            usage[name], logits[name] = r.usage, logits_of(r)
            weight = next(srv.server.registry.get("").teacher.parameters())
            assert weight.dtype == getattr(torch, name)
            metric[name] = srv.server.metrics.render().decode()
        rows = ledger_rows(f"sqlite:///{db / 'ledger.db'}")
        assert len(rows) == 1
        assert rows[0]["gflops"] == pytest.approx(usage[name].gflops, rel=1e-12)
    assert info == {"float32": "float32", "bfloat16": "bfloat16"}
    assert 'maskedkd_dtype_top1_agreement{dtype="bfloat16"' in metric["bfloat16"]
    assert 'maskedkd_dtype_top1_agreement{dtype="float32"' in metric["float32"]
    fp32, bf16 = usage["float32"], usage["bfloat16"]
    assert (fp32.images, fp32.tokens, fp32.gflops, fp32.full_gflops, fp32.cost) == \
        (bf16.images, bf16.tokens, bf16.gflops, bf16.full_gflops, bf16.cost)
    assert not torch.equal(logits["float32"], logits["bfloat16"])  # it really was served in another dtype
    torch.testing.assert_close(logits["bfloat16"], logits["float32"], rtol=0.1, atol=0.1)


def test_fidelity_below_the_threshold_refuses_to_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = teacher_cli(["serve", "--model", "vit_tiny_patch16_224", "--model-kwargs",
                        '{"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 2}', "--dtype", "bfloat16",
                        "--min-dtype-agreement", "1.01", "--port", "0", "--no-metrics",
                        "--db", f"sqlite:///{tmp_path / 'l.db'}"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("teacher-server: error:")]
    assert len(errors) == 1, err
    assert "bfloat16" in errors[0] and "agreement 1.0000" in errors[0] and "KL" in errors[0]
    assert "--min-dtype-agreement 1.01" in errors[0]


def test_compile_shapes_parse_and_need_static() -> None:
    assert ServerSettings(compile="static", compile_shapes="2:4, 8:16").compile_shapes == ((2, 4), (8, 16))
    with pytest.raises(ValueError, match="B:K"):
        ServerSettings(compile="static", compile_shapes="2x4")
    with pytest.raises(ValueError, match="compile=static"):
        ServerSettings(compile_shapes="2:4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_auto_dtype_follows_compute_capability(tmp_path: Path) -> None:
    major, _ = torch.cuda.get_device_capability(0)
    expected = "bfloat16" if major >= 8 else "float32"
    assert resolve_dtype("auto", "cuda")[0] == getattr(torch, expected)
    with running_server(settings(tmp_path, device="cuda"), model=tiny_vit()) as srv:
        channel, client = stub(srv.address)
        with channel:
            assert client.GetModelInfo(pb.ModelInfoRequest()).dtype == expected
        assert srv.server.registry.get("").fidelity.agreement >= 0.98
