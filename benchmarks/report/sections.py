"""The sections of docs/benchmarks.md: each one's tables and sentences from one run's results, and their order
(`RENDER`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.report.tables import KEEP, Column, Section, columns_table, keep, model_tables, pct, table
from benchmarks.serving.ledger_scale import render_ledger

_TEACHER: tuple[Column, ...] = (
    KEEP,
    ("patches", lambda x: x["kept"]),
    ("GFLOPs/img", lambda x: f"{x['gflops_per_image']:.3f}"),
    ("FLOP-ratio speedup", lambda x: f"{x['flop_speedup']:.2f}x"),
    ("in-process img/s", lambda x: f"{x['inprocess']['images_per_s']:.1f}"),
    ("in-process speedup", lambda x: f"{x['inprocess_speedup']:.2f}x"),
    ("gRPC img/s", lambda x: f"{x['grpc']['images_per_s']:.1f}"),
    ("gRPC speedup", lambda x: f"{x['grpc_speedup']:.2f}x"),
)


def _teacher(s: Section) -> str:
    parts = [
        f"Batch {s['batch']}; calls per timed repeat: {s['calls_per_repeat']}; median of the repeats. gRPC: "
        "one `TeacherClient`, kept patches as uint8, one request in flight, server in its own process."
    ]
    parts += model_tables(
        s, _TEACHER, lambda m: f"**{m['label']}** (`{m['timm_name']}` {m['kwargs']}, {m['num_patches']} patches)"
    )
    return "\n\n".join(parts)


def _server_eff(s: Section) -> str:
    rows = [
        (
            m["model"],
            keep(x["keep"]),
            f"{x['grpc']['images_per_s']:.1f}",
            f"{x['inprocess']['images_per_s']:.1f}",
            pct(x["server_efficiency"]),
            "yes" if x["billing_matches_flop_model"] else "NO",
        )
        for m in s["models"]
        for x in m["rows"]
    ]
    return table(("model", "keep", "gRPC img/s", "in-process img/s", "gRPC / in-process", "billed = FLOP model"), rows)


def _compute_eff(s: Section) -> str:
    rows = []
    for m in s["models"]:
        for x in m["rows"]:
            c = x.get("compiled")
            rows.append(
                (
                    m["model"],
                    keep(x["keep"]),
                    f"{x['achieved_gflops_per_s']:.1f}",
                    pct(x["compute_efficiency"]),
                    "-" if c is None else f"{c['achieved_gflops_per_s']:.1f}",
                    "-" if c is None else pct(c["compute_efficiency"]),
                    "-" if c is None else f"{c['vs_eager']:.2f}x",
                    "-" if c is None else f"{c['first_call_s']:.1f}",
                )
            )
    return (
        "FLOP rate of the in-process masked forward, counting FLOPs with the FLOP model (matrix products only), "
        f"over this machine's `torch.matmul` rate in the dtype served ({s.get('dtype', 'float32')}, "
        f"{s['matmul_gflops_per_s']:.1f} GFLOP/s). Eager is what "
        "`teacher-server serve` runs by default; compiled is `--compile static` (inductor with frozen weights, one "
        "graph per batch shape; the first call of a shape pays the compile).\n\n"
        + table(
            (
                "model",
                "keep",
                "eager GFLOP/s",
                "eager share",
                "compiled GFLOP/s",
                "compiled share",
                "compiled / eager",
                "compile s (first call)",
            ),
            rows,
        )
    )


def _masking(s: Section) -> str:
    rows = []
    for m in s["models"]:
        for x in m["rows"][1:]:
            rows.append(
                (
                    m["model"],
                    keep(x["keep"]),
                    f"{x['inprocess_speedup']:.2f}x",
                    f"{x['flop_speedup']:.2f}x",
                    f"{x['inprocess_speedup'] / x['flop_speedup']:.2f}",
                )
            )
    return table(("model", "keep", "in-process speedup", "FLOP-ratio speedup", "measured / FLOP ratio"), rows)


_WIRE: tuple[Column, ...] = (
    KEEP,
    ("sent as", lambda x: x["payload"]),
    ("pixels", lambda x: x["pixel_dtype"]),
    ("bytes/image", lambda x: f"{x['bytes_per_image']:.0f}"),
    ("kept uint8 bytes", lambda x: f"{x['kept_uint8_bytes']:.0f}"),
    ("vs kept uint8", lambda x: f"{x['vs_kept_uint8']:.3f}"),
    ("vs float32 image", lambda x: pct(x["vs_float32_image"])),
)


def _wire(s: Section) -> str:
    parts = model_tables(
        s,
        _WIRE,
        lambda m: (
            f"**{m['label']}**: image {m['image']} = {m['raw_uint8_bytes']} B as uint8, "
            f"{m['float32_image_bytes']} B as float32; batch {m['batch']}"
        ),
    )
    return (
        "Serialized `InferRequest` size / images, built by the product's client from un-normalized images.\n\n"
        + "\n\n".join(parts)
    )


_MICROBATCH: tuple[Column, ...] = (
    (
        "clients",
        lambda x: f"{x['clients']} x batch {x['batch_per_client']}" + (" (reference)" if x.get("reference") else ""),
    ),
    ("images", lambda x: x["images"]),
    ("img/s", lambda x: f"{x['images_per_s']:.1f}"),
    ("vs reference", lambda x: f"{x['vs_reference']:.2f}"),
    ("mean micro-batch", lambda x: f"{x['mean_batch_images']:.1f}"),
    ("max micro-batch", lambda x: x["max_batch_images"]),
)


def _microbatch(s: Section) -> str:
    cfgs = s["server_settings"]
    parts = [
        f"Server settings: {cfgs}. Each client its own `TeacherClient`, requests back to back; keep "
        f"{keep(s['models'][0]['keep']) if s['models'] else '-'}; micro-batch sizes from the server's ledger."
    ]
    for m in s["models"]:
        reference = {**m["reference"], "clients": 1, "vs_reference": 1.0, "reference": True}  # one client
        parts.append(f"**{m['label']}**\n\n" + columns_table(_MICROBATCH, [reference, *m["rows"]]))
    return "\n\n".join(parts)


def _training(s: Section) -> str:
    pipelined = s["micro_batches"] > 1
    parts = [
        f"`run_training` in this process (one worker, torch threads: {s['threads']}, data `{s['data']}`, "
        f"{s['micro_batches']} micro-batch(es) per step), teacher server in its own process on loopback with as "
        f"many threads. Predicted FLOPs per image: {s['flops_per_training_image']}. "
        + (
            "Pipelined as in App. E: student and teacher overlap on the same cores."
            if pipelined
            else "Student and teacher share the cores, so they take turns (no pipelining), which is what the FLOP "
            "sum assumes."
        )
    ]
    for p in s["pairs"]:
        for label, modes in (("", p["modes"]), (" — teacher served with `--compile static`", p.get("compiled_modes"))):
            if not modes:
                continue
            rows = [
                (
                    name,
                    f"{m['step_s'] * 1e3:.0f}",
                    f"{m['predicted_gflops_per_image']:.3f}",
                    f"{m['speedup_vs_full_kd']:.2f}x",
                    f"{m['predicted_speedup_vs_full_kd']:.2f}x",
                    f"{m['of_predicted']:.2f}",
                )
                + ((pct(m["overlap"]) if m.get("overlap") is not None else "",) if pipelined else ())
                for name, m in modes.items()
            ]
            parts.append(
                f"**{p['label']}**{label}: batch {p['batch_size']}, median of {p['timed_steps']} steps after "
                f"{p['warmup_steps']} warm-up\n\n"
                + table(
                    ("mode", "ms/step", "GFLOPs/img (model)", "speedup vs full KD", "predicted", "measured / predicted")
                    + (("teacher overlap",) if pipelined else ()),
                    rows,
                )
            )
    return "\n\n".join(parts)


_FLOPS: tuple[Column, ...] = (
    ("model", lambda x: x["model"]),
    KEEP,
    ("patches", lambda x: x["kept"]),
    ("FLOP model", lambda x: f"{x['flop_model'] / 1e9:.4f}"),
    ("FlopCounterMode", lambda x: f"{x['flop_counter'] / 1e9:.4f}"),
    ("ratio", lambda x: f"{x['ratio']:.4f}"),
    ("attention share", lambda x: pct(x["attention_share"])),
)


def _flops(s: Section) -> str:
    return (
        f"GFLOPs of one image's masked forward. Largest deviation: {100 * s['max_abs_deviation']:.3f}%.\n\n"
        + columns_table(_FLOPS, s["rows"])
    )


def _breakdown(s: Section) -> str:
    parts = [s["note"] + "."]
    for m in s["models"]:
        groups = ", ".join(f"{g} {pct(v['share'])}" for g, v in m["groups"].items())
        mm = (
            "n/a"
            if m["matmul_gflops_per_s"] is None
            else (f"{m['matmul_gflops_per_s']:.1f} GFLOP/s ({pct(m['matmul_vs_machine'])} of the machine's matmul)")
        )
        att = "n/a" if m["attention_gflops_per_s"] is None else f"{m['attention_gflops_per_s']:.1f} GFLOP/s"
        parts.append(
            f"- **{m['model']}** keep {keep(m['keep'])}, batch {m['batch']}: {groups}. Matrix products "
            f"reach {mm}; fused attention {att}; time outside products and attention: "
            f"{pct(m['non_product_share'])}."
        )
    return "\n".join(parts)


_GPU: tuple[Column, ...] = (
    KEEP,
    ("img/s", lambda x: f"{x['images_per_s']:.0f}"),
    ("speedup", lambda x: f"{x['speedup']:.2f}x"),
    ("FLOP ratio", lambda x: f"{x['flop_speedup']:.2f}x"),
    ("TFLOP/s", lambda x: f"{x['tflops_per_s']:.1f}"),
    ("of spec peak", lambda x: pct(x["of_spec_peak"])),
    ("of bf16 matmul", lambda x: pct(x["of_matmul"])),
    ("gRPC / in-process", lambda x: pct(x.get("server_efficiency"))),
)


def _gpu(s: Section) -> str:
    mm = s["matmul_bf16"]
    parts = [
        f"{s['device']}, {s['dtype']}; spec peak {s['spec_peak_tflops'] or 'unknown'} TFLOP/s; measured bf16 "
        f"matmul {mm['n']}x{mm['n']}: {mm['gflops_per_s'] / 1e3:.1f} TFLOP/s."
    ]
    parts += model_tables(s, _GPU, lambda m: f"**{m['label']}**, batch {m['batch']}")
    return "\n\n".join(parts)


def _alone_ms(train: dict[str, Any], precision: str) -> str:
    alone = train.get("student_alone", {}).get(precision)  # runs before 2026-12-06 did not time it
    return f"{alone['step_s'] * 1e3:.0f}" if alone else ""


def _precision(s: Section) -> str:
    mm = s["matmul"]
    rows = [
        (
            d,
            f"{mm[d]['n']}",
            f"{s['rates'][d]:.2f}",
            "yes" if d == s["limit_dtype"] else "",
            "yes" if d == s["served_dtype"] else "",
        )
        for d in ("float32", "bfloat16")
    ]
    text = (
        f"Native bf16, faster than fp32: **{'yes' if s['native_bf16'] else 'no'}** ({s['why']}). "
        f"`--dtype auto` serves **{s['served_dtype']}**; the machine's limit is the {s['limit_dtype']} matmul rate "
        f"({s['limit_gflops_per_s']:.1f} GFLOP/s); bf16 runs at {s['bf16_vs_fp32']:.3f}x the fp32 rate.\n\n"
        + table(("dtype", "matmul n", "GFLOP/s", "machine limit", "served by auto"), rows)
    )
    train = s.get("training")
    if train:
        st = train["steps"]
        text += (
            "\n\nMaskedKD-50 (SIPS) training step, student forward in fp32 vs bf16 autocast (SIPS and the loss "
            f"in fp32), `{train['student']}`, batch {train['batch_size']}:\n\n"
            + table(
                ("precision", "ms / step", "steps timed", "student alone (no KD), ms / step"),
                [
                    (p, f"{st[p]['step_s'] * 1e3:.0f}", st[p]["steps_timed"], _alone_ms(train, p))
                    for p in ("fp32", "bf16")
                ],
            )
            + f"\n\nfp32 step / bf16 step: {train['bf16_speedup']:.3f}x"
            + (
                f"; the student alone: {train['student_alone_bf16_speedup']:.3f}x (the teacher's time, the same in "
                "both, is the rest)."
                if "student_alone" in train
                else "."
            )
        )
    pair = s.get("default_vs_fp32_server")
    if pair:
        text += (
            f"\n\nDefault server vs fp32 server, keep 50%, median of {pair['rounds']} interleaved rounds: "
            f"{pair['default_images_per_s']:.1f} vs {pair['fp32_images_per_s']:.1f} img/s ({pair['ratio']:.2f}x)."
        )
    return text


def _serving(section: dict[str, Any]) -> str:
    from benchmarks.serving.overhead import table

    text = "CPU microseconds per image served (server process, every thread), by stage:\n\n" + table(section["rows"])
    if section.get("client"):
        from benchmarks.serving.client_path import table as client_table

        text += (
            "\n\nThe client's side: CPU microseconds per image of one `TeacherClient` sending uint8 kept patches "
            "(build, call, decode: the calling thread; whole process: gRPC's threads too), glibc's malloc settings "
            "(`student-client train` tunes them), medians of the rounds:\n\n" + client_table(section["client"])
        )
    return text


def _tenants(section: dict[str, Any]) -> str:
    from benchmarks.serving.tenants import table

    return table(section)


RENDER: tuple[tuple[str, str, Callable[[Section], str]], ...] = (
    ("teacher", "Teacher throughput by keep", _teacher),
    ("teacher", "Server efficiency (gRPC / in-process, same batch and dtype, interleaved rounds)", _server_eff),
    ("teacher", "Compute efficiency", _compute_eff),
    ("teacher", "Masking speedup against the FLOP ratio", _masking),
    ("wire", "Bytes on the wire per image", _wire),
    ("microbatch", "Micro-batching across clients", _microbatch),
    ("training", "End-to-end training step time", _training),
    ("flops", "FLOP model against FlopCounterMode", _flops),
    ("breakdown", "Where the masked forward's time goes", _breakdown),
    ("gpu", "GPU (bf16)", _gpu),
    ("ledger", "Ledger at scale", render_ledger),
    ("precision", "Precision: matmul rate per dtype, the served dtype, training step fp32 vs bf16", _precision),
    ("serving", "The serving path's own cost (negligible teacher, DeiT-S geometry, keep 50%)", _serving),
    ("tenants", "Two tenants on one teacher: a light key under a greedy key's flood", _tenants),
)
