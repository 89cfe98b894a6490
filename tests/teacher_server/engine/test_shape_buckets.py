"""Prepared forward shapes (`--compile-shapes`): a micro-batch of any size runs in the listed (B, K) shapes, padded,
and every row gets the answer the teacher gives it alone; `--compile static` serves a ragged stream of request sizes
without compiling again; on CUDA, `--compile graphs` replays captured graphs with the eager forward's answers."""

from __future__ import annotations

import urllib.request

import pytest
import service_testkit as kit
import timm
import torch
from prometheus_client.parser import text_string_to_metric_families

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.served_model import make_forward
from teacher_server.engine.teacher.shape_buckets import BucketedForward, PaddedShape, ShapeBuckets
from teacher_server.engine.teacher.teacher_loader import ModelLoadError

pytestmark = [pytest.mark.dtype("float32", device="cpu"), pytest.mark.timeout(300)]
K = 12


def _rows(teacher: MaskedTeacher, images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images [G,C,H,W] 0..1, keep [G,K], uint8 pixels of the kept patches [G,K,C,P,P]) of `images` random images."""
    x, keep = kit.random_images(images, seed=seed), kit.random_keep(images, K, seed=seed + 1)
    return x, keep, kit.patches_of(x, keep)


@pytest.mark.dtype("none")
@pytest.mark.parametrize("sizes", [(2, 4), (16, 32, 64), (3, 5), (64, 128, 192, 256)])
def test_pieces_cover_the_rows_with_the_least_padding(sizes: tuple[int, ...]) -> None:
    buckets = ShapeBuckets.of([(b, K) for b in sizes] + [(8, 3)])
    for rows in range(1, 3 * max(sizes) + 2):
        pieces = buckets.pieces(rows, K)
        assert pieces is not None
        assert [p[0] for p in pieces] == [0, *[p[1] for p in pieces[:-1]]] and pieces[-1][1] == rows  # consecutive
        assert all(b in sizes and 0 < end - start <= b for start, end, b in pieces)
        assert all(end - start == b for start, end, b in pieces[:-1])  # only the last piece is padded
        assert sum(b for _, _, b in pieces) == least_total(rows, sizes)
    assert buckets.pieces(5, K + 1) is None


def least_total(rows: int, sizes: tuple[int, ...]) -> int:
    """The smallest sum of prepared sizes >= rows, found by listing every reachable sum."""
    reachable, frontier = set(), {0}
    while frontier:
        reachable |= frontier
        frontier = {s + b for s in frontier for b in sizes if s < rows} - reachable
    return min(s for s in reachable if s >= rows)


class RecordedUse:
    """A `ShapeUse` that keeps what it is told."""

    def __init__(self) -> None:
        self.pieces: dict[tuple[int, int], int] = {}
        self.served: dict[tuple[int, int], int] = {}
        self.padding: dict[tuple[int, int], int] = {}
        self.fallback_rows = 0

    def piece(self, shape: tuple[int, int], rows: int) -> None:
        self.pieces[shape] = self.pieces.get(shape, 0) + 1
        self.served[shape] = self.served.get(shape, 0) + rows
        self.padding[shape] = self.padding.get(shape, 0) + shape[0] - rows

    def fallback(self, rows: int) -> None:
        self.fallback_rows += rows


def test_every_batch_size_runs_in_the_listed_shapes_with_each_rows_own_answer(caplog: pytest.LogCaptureFixture) -> None:
    """float32, CPU: batches of 1-9 rows through shapes 2:K and 4:K give timm's own logits for each row; how each
    size was cut is logged once; the rows told to `use` are the batches' rows, the padding the least there is."""
    caplog.set_level("INFO", logger="teacher_server.engine.teacher.shape_buckets")
    model = kit.tiny_vit()
    teacher, ref = MaskedTeacher(model), kit.Reference(model)
    seen: list[tuple[int, int]] = []

    def recording(pixels: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        seen.append(tuple(indices.shape))
        return teacher.forward_pixels(pixels, indices, counts)

    shapes = {(b, K): PaddedShape(recording, b, K, teacher.geometry, torch.device("cpu")) for b in (2, 4)}
    use = RecordedUse()
    forward = BucketedForward(shapes, recording, use=use)  # type: ignore[arg-type]  # PaddedShape is a ShapeFn
    for images in range(1, 10):
        x, keep, pixels = _rows(teacher, images, seed=images)
        with torch.inference_mode():
            got = forward(pixels, keep, None)
        torch.testing.assert_close(got, ref.logits(x, keep), **kit.CLOSE)
    assert set(seen) == {(2, K), (4, K)}
    assert sum(use.pieces.values()) == len(seen)
    assert sum(use.served.values()) == sum(range(1, 10)) and use.fallback_rows == 0
    assert sum(use.padding.values()) == sum(least_total(images, (2, 4)) - images for images in range(1, 10))
    assert f"micro-batches of 7 images at K={K} run as 4+4 (1 padding rows)" in caplog.messages
    assert len(caplog.messages) == 9  # one line per size


def test_rows_without_a_listed_shape_run_the_fallback_unpadded() -> None:
    """float32, CPU: an unlisted K, ragged rows with counts and float pixels reach the fallback as they are."""
    teacher = MaskedTeacher(kit.tiny_vit())
    seen: list[tuple[int, ...]] = []

    def fallback(pixels: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        seen.append(tuple(pixels.shape[:2]))
        return teacher.forward_pixels(pixels, indices, counts)

    use = RecordedUse()
    forward = BucketedForward(
        {(4, K): PaddedShape(teacher.forward_pixels, 4, K, teacher.geometry, torch.device("cpu"))}, fallback, use=use
    )
    _, keep, pixels = _rows(teacher, 3, seed=5)
    with torch.inference_mode():
        forward(pixels[:, :8], keep[:, :8], None)  # K=8: not listed
        forward(pixels, keep, torch.tensor([K, 9, 5]))  # ragged
        forward(pixels.float(), keep, None)  # float pixels: the shapes were prepared for uint8
    assert seen == [(3, 8), (3, K), (3, K)]
    assert use.pieces == {} and use.served == {}
    assert use.fallback_rows == 9


@pytest.mark.slow
def test_compiled_shapes_serve_any_request_size_without_compiling_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """float32, CPU, `--compile static --compile-shapes 2:12,4:12`: requests of 1, 3 and 6 images (pieces 2, 4 and
    4+2) add no graph after start-up, answer timm's logits and are billed their own images only; the metrics count
    the rows each shape served and padded (not the start-up warm-up's)."""
    from torch._dynamo.utils import counters

    from teacher_server.testing.server import running_server

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10, depth=1
    ).eval()  # one block: the compiles stay short
    ref = kit.Reference(model)
    settings = kit.settings(tmp_path, compile="static", compile_shapes="2:12,4:12", metrics_port=0)
    with running_server(settings, model=model) as srv:
        graphs_at_start = counters["stats"]["unique_graphs"]
        key = srv.create_key("buckets")
        _, stub = kit.stub(srv.address)
        for images in (1, 3, 6):
            x, keep = kit.random_images(images, seed=images), kit.random_keep(images, K, seed=10 + images)
            response = stub.Infer(
                kit.patch_request(kit.patches_of(x, keep), keep, request_id=f"b{images}"),
                metadata=kit.auth(key),
                timeout=240,
            )
            torch.testing.assert_close(kit.logits_of(response), ref.logits(x, keep), **kit.CLOSE)
            assert response.usage.gflops == pytest.approx(images * MaskedTeacher(model).gflops(K), rel=1e-9)
        assert counters["stats"]["unique_graphs"] == graphs_at_start  # every piece ran a graph compiled at start-up
        assert srv.metrics_url is not None
        text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    rows = {
        (sample.labels["shape"], sample.labels["rows"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "maskedkd_shape_rows"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    # 1 -> 2 (1 padding), 3 -> 4 (1 padding), 6 -> 4 + 2
    assert rows == {("2:12", "served"): 3, ("2:12", "padding"): 1, ("4:12", "served"): 7, ("4:12", "padding"): 1}
    assert f'maskedkd_unprepared_rows_total{{model="{srv.settings.served_name or srv.settings.model}"}} 0.0' in text


@pytest.mark.dtype("none")
def test_graphs_need_shapes_and_shapes_need_a_compile_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="compile=graphs needs compile_shapes"):
        kit.settings(tmp_path, compile="graphs")
    with pytest.raises(ValueError, match="compile_shapes needs compile=static or graphs"):
        kit.settings(tmp_path, compile_shapes="2:12")


def test_graphs_on_a_cpu_teacher_are_a_load_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """float32, CPU: CUDA graphs need a CUDA teacher; the server refuses to start with the reason."""
    from teacher_server.service.server import TeacherServer

    with pytest.raises(ModelLoadError, match="captures CUDA graphs; this teacher is on cpu"):
        TeacherServer(kit.settings(tmp_path, compile="graphs", compile_shapes="2:12"), model=kit.tiny_vit())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.dtype("float32", device="cuda")
def test_cuda_graphs_answer_each_batch_like_the_eager_forward() -> None:
    """float32, CUDA, `--compile graphs` shapes 2:12 and 4:12: batches of 1-9 rows, one after another (each replay
    reads its own rows and its logits are copied out before the next), give the eager forward's logits."""
    model = kit.tiny_vit().to("cuda")
    teacher = MaskedTeacher(model)
    graphed = make_forward(teacher, torch.device("cuda"), torch.float32, "graphs", shapes=((2, K), (4, K)))
    eager = make_forward(teacher, torch.device("cuda"), torch.float32)
    for images in range(1, 10):
        _, keep, pixels = _rows(teacher, images, seed=20 + images)
        pixels, keep = pixels.cuda(), keep.cuda()
        with torch.inference_mode():
            torch.testing.assert_close(graphed(pixels, keep, None), eager(pixels, keep, None), atol=1e-4, rtol=1e-4)
