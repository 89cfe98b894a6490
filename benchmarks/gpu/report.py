"""The GPU run's report (benchmarks/gpu/script.py): docs/gpu.md from the run's result, written again after every step
with the steps not reached marked so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.gpu.plan import INGEST_WORKERS, WORKERS_TRAIN_MODE
from benchmarks.report.tables import keep, pct, table


def _training_md(t: dict[str, Any]) -> list[str]:
    title = "## Training step, student and teacher on the same device (bf16 where native)"
    if "error" in t:
        return [title, "", f"failed: {t['error']}"]
    no_kd = t["modes"].get("no_kd", {}).get("step_s")
    rows = [
        (
            name,
            f"{1e3 * m['step_s']:.1f}",
            f"{t['batch_size'] / m['step_s']:.0f}",
            f"{m['teacher_gflops']:.0f}",
            f"{m['step_s'] / no_kd:.2f}x" if no_kd else "",
            f"{m['speedup_vs_full_kd']:.2f}x",
            f"{m['predicted_speedup_vs_full_kd']:.2f}x",
        )
        for name, m in t["modes"].items()
    ]
    name, opts = WORKERS_TRAIN_MODE
    return [
        title,
        "",
        f"{t['label']}, batch {t['batch_size']}: median of {t['timed_steps']} steps after "
        f"{t['warmup_steps']} warm-up steps (`step_s`: data on hand to optimizer step, teacher answers through "
        f"gRPC included). The teacher modes send each step's batch as one request, except {name}: "
        f"{opts['micro_batches']} micro-batches pipelined over {opts['teacher_connections']} connections (a stream on "
        f"each) to a teacher serving with `--ingest-workers {INGEST_WORKERS}`. Target: MaskedKD-50 at most 1.3x the "
        "no-KD step.",
        "",
        table(("mode", "step ms", "img/s", "teacher GFLOPs billed", "step vs no KD", "vs full KD", "FLOP model"), rows),
    ]


def _forward_md(g: dict[str, Any]) -> list[str]:
    if "error" in g:
        return ["## Masked forward", "", f"failed: {g['error']}"]
    rows = [
        (
            mod["label"],
            keep(r["keep"]),
            r["kept"],
            f"{r['images_per_s']:.0f}",
            f"{r['tflops_per_s']:.1f}",
            pct(r["of_spec_peak"]),
            pct(r["of_matmul"]),
            f"{r['billed_gflops_per_image']:.2f}",
            f"{r['speedup']:.2f}x",
            f"{r['flop_speedup']:.2f}x",
            f"{r['graphed']['eager_images_per_s']:.0f}" if r.get("graphed") else "-",
            f"{r['graphed']['images_per_s']:.0f}" if r.get("graphed") else "-",
            f"{r['graphed']['of_eager']:.2f}x" if r.get("graphed") else "-",
        )
        for mod in g["models"]
        for r in mod["rows"]
    ]
    return [
        f"## Masked forward, {g['dtype']}, batch {g['models'][0]['batch']} (random weights)",
        "",
        f"{g['device']}; datasheet bf16 peak {g['spec_peak_tflops'] or 'unknown'} TFLOP/s; bf16 matmul measured "
        f"{g['matmul_bf16']['gflops_per_s'] / 1e3:.1f} TFLOP/s (n={g['matmul_bf16']['n']}). The last three "
        "columns: the uint8-pixel forward the server runs, eager and as `serve --compile graphs` replays it (CUDA "
        "graphs of this shape; the other columns are the eager forward on normalized bf16 patches).",
        "",
        table(
            (
                "model",
                "keep",
                "patches",
                "img/s",
                "TFLOP/s",
                "of datasheet peak",
                "of bf16 matmul",
                "billed GFLOPs/img",
                "speedup vs keep 100%",
                "FLOP ratio",
                "uint8 eager img/s",
                "CUDA graphs img/s",
                "graphs / eager",
            ),
            rows,
        ),
    ]


def _server_md(c: dict[str, Any], device: str) -> list[str]:
    title = "## Through the server at keep 50%, against the in-process forward"
    if "error" in c:
        return [title, "", f"failed: {c['error']}"]
    rows = [
        (
            r["label"],
            r["clients"],
            "shared memory" if r.get("shared_memory") else "messages",
            f"{r['ingest_workers']} ingest + device"
            if r.get("ingest_workers")
            else "one" + (f", `--compile {r['compile']}`" if r.get("compile", "off") != "off" else ""),
            f"{r['images_per_s']:.0f}",
            f"{r['inprocess_images_per_s']:.0f}" if r["inprocess_images_per_s"] else "-",
            pct(r["of_inprocess"]) if r["of_inprocess"] is not None else "-",
            f"{r['ingest_gb_per_s']:.2f}",
            pct(r["busy_share"]),
            pct(r["padding_share"]) if r.get("padding_share") is not None else "-",
            "yes" if r["billing_matches_flop_model"] else "NO",
            r["error_count"],
        )
        for r in c["rows"]
    ]
    first = c["rows"][0] if c["rows"] else {"batch_per_request": 0, "requests_per_client": 0}
    return [
        title,
        "",
        f"`teacher-server serve --device {device} --dtype auto`, each client sends {first['requests_per_client']} "
        f"requests of {first['batch_per_request']} images of uint8 kept patches, one call at a time, in the messages "
        "or through shared memory (`--shared-memory`; GB/s in then counts the bytes the regions carried). Busy: the "
        "forward's share of the wall time (`maskedkd_compute_seconds`). Padding: the share of the rows run in "
        "prepared shapes that were padding (`maskedkd_shape_rows_total`). Then per model: the same 32 clients "
        f"against `--ingest-workers {INGEST_WORKERS}` (that many processes receive, check and bill; one runs the "
        "teacher); for the first model also against one process replaying CUDA graphs (`--compile graphs "
        "--compile-shapes` of the micro-batch sizes 1-8 requests make; `static` in a dry run on the CPU).",
        "",
        table(
            (
                "model",
                "clients",
                "pixels in",
                "server processes",
                "img/s",
                "in-process img/s",
                "of in-process",
                "GB/s in",
                "busy",
                "padding",
                "billed = FLOPs",
                "errors",
            ),
            rows,
        ),
    ]


def _mixed_md(m: dict[str, Any]) -> list[str]:
    title = "## Mixed-keep load (ragged keep counts in every request)"
    if "error" in m:
        return [title, "", f"failed: {m['error']}"]
    return [
        title,
        "",
        f"{m['model']}, {m['clients']} clients, {m['requests']} requests: {m['answered']} answered, "
        f"{m['internal']} INTERNAL, {m['error_count']} errors {m['errors'] or ''}; ledger = answers: "
        f"{'yes' if m['ledger_equals_answers'] else 'NO'}; {m['images_per_s']:.0f} img/s.",
    ]


NOT_RUN = "not run: the run stopped before this step"
NOT_ASKED = "not run: not asked for (`--only`)"


def render(result: dict[str, Any]) -> str:
    """The report of `result`; a run that stopped early (killed at its time limit) shows the steps it finished."""
    m, t = result["machine"], result.get("tests")
    skipped = set(result.get("skipped", ()))

    def not_run(key: str) -> str:
        return NOT_ASKED if key in skipped else NOT_RUN

    done = "total_s" in result
    seconds = result["total_s"] if done else result.get("elapsed_s", 0.0)
    lines = [
        "# GPU figures" + (" (DRY RUN on the CPU: not GPU figures)" if result["dry_run"] else ""),
        "",
        f"Made by `{result['command']}` on {result['started_utc']} in {seconds:.0f} s"
        + ("" if done else " (STOPPED EARLY: the steps marked so did not run)")
        + f". GPU: {m.get('gpu', 'none')}; torch {m['torch']}, timm {m['timm']}, git {m['git']}.",
        "",
        "## Tests that need CUDA",
        "",
        f"`{t['command']}`: {t['summary']} (exit {t['returncode']})." if t else not_run("tests"),
        "",
    ]
    sections = (  # the steps after the CUDA tests, in order: (key, the title shown when it did not run, its renderer)
        ("forward", "Masked forward", _forward_md),
        ("server", "Through the server", lambda step: _server_md(step, result["device"])),
        ("mixed_keep", "Mixed-keep load", _mixed_md),
        ("training", "Training step", _training_md),
    )
    for key, title, rendered in sections:
        if key in result:
            lines += [*rendered(result[key]), ""]
        else:
            lines += [f"## {title}", "", not_run(key), ""]
    return "\n".join(lines)


def save(result: dict[str, Any], path: Path) -> None:
    """The report and its JSON, written again after every step: a run killed at its time limit leaves what it did."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(result))
    path.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
