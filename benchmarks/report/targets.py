"""The issue's targets, each a ratio measured in this run, checked as PASS / MISS with the numbers behind it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.config import TARGET_KEEPS

NOT_NATIVE_PREFIX = "not applicable on this CPU (bf16 not native, or not faster)"


@dataclass(frozen=True)
class Target:
    name: str  # which target
    scope: str  # model / keep / pair it applies to
    value: float  # measured ratio
    op: str  # ">=" or "<="
    threshold: float
    detail: str  # the numbers the ratio comes from
    applicable: bool = True  # False: the target does not apply to this machine (detail says why, and what was measured)

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    @property
    def result(self) -> str:
        return "N/A" if not self.applicable else "PASS" if self.passed else "MISS"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "result": self.result}


def _pct(keep: float) -> str:
    return f"keep {keep * 100:.0f}%"


def teacher_targets(section: dict[str, Any]) -> list[Target]:
    out = []
    dtype = section.get("dtype", "float32")
    for m in section.get("models", []):
        for r in m["rows"]:
            if r["keep"] in TARGET_KEEPS:
                out.append(
                    Target(
                        "serving overhead: gRPC / in-process throughput, same dtype",
                        f"{m['model']} {_pct(r['keep'])}",
                        r["server_efficiency"],
                        ">=",
                        0.95,
                        f"median of {section.get('rounds', 1)} interleaved rounds in {dtype}; gRPC "
                        f"{r['grpc']['images_per_s']:.1f} img/s vs in-process {r['inprocess']['images_per_s']:.1f}"
                        f" img/s, batch {m['batch']}",
                    )
                )
            out.append(
                Target(
                    f"compute efficiency, eager: masked forward / {dtype} matmul rate",
                    f"{m['model']} {_pct(r['keep'])}",
                    r["compute_efficiency"],
                    ">=",
                    0.75,
                    f"{r['achieved_gflops_per_s']:.1f} GFLOP/s (FLOP model) vs matmul "
                    f"{section['matmul_gflops_per_s']:.1f} GFLOP/s",
                )
            )
            if r.get("compiled") is not None:
                c = r["compiled"]
                out.append(
                    Target(
                        f"compute efficiency, `--compile static`: masked forward / {dtype} matmul rate",
                        f"{m['model']} {_pct(r['keep'])}",
                        c["compute_efficiency"],
                        ">=",
                        0.75,
                        f"{c['achieved_gflops_per_s']:.1f} GFLOP/s (FLOP model) vs matmul "
                        f"{section['matmul_gflops_per_s']:.1f} GFLOP/s; {c['first_call_s']:.0f} s to compile the shape",
                    )
                )
        half = next((r for r in m["rows"] if r["keep"] == 0.5), None)
        if half is not None:
            out.append(
                Target(
                    "masking speedup: keep 50% in-process speedup / FLOP ratio",
                    m["model"],
                    half["inprocess_speedup"] / half["flop_speedup"],
                    ">=",
                    1.0,
                    f"measured {half['inprocess_speedup']:.2f}x vs FLOP ratio {half['flop_speedup']:.2f}x",
                )
            )
    return out


def wire_targets(section: dict[str, Any]) -> list[Target]:
    return [
        Target(
            "wire: bytes per image / kept uint8 pixels",
            f"{m['model']} {_pct(r['keep'])}",
            r["vs_kept_uint8"],
            "<=",
            1.05,
            f"{r['bytes_per_image']:.0f} B vs {r['kept_uint8_bytes']:.0f} B kept uint8 "
            f"({r['vs_float32_image'] * 100:.1f}% of a float32 image)",
        )
        for m in section.get("models", [])
        for r in m["rows"]
    ]


def microbatch_targets(section: dict[str, Any]) -> list[Target]:
    out = []
    for m in section.get("models", []):
        eight = next((r for r in m["rows"] if r["clients"] == 8), None)
        if eight is not None:
            ref = m["reference"]
            out.append(
                Target(
                    "micro-batching: 8 concurrent clients / one client of their total batch",
                    m["model"],
                    eight["vs_reference"],
                    ">=",
                    0.90,
                    f"{eight['images_per_s']:.1f} vs {ref['images_per_s']:.1f} img/s (clients of batch "
                    f"{eight['batch_per_client']} vs one of batch {ref['batch_per_client']}; mean micro-batch "
                    f"{eight['mean_batch_images']:.1f} images)",
                )
            )
    return out


def training_targets(section: dict[str, Any]) -> list[Target]:
    out = []
    for p in section.get("pairs", []):
        for label, modes in (("", p["modes"]), (", teacher `--compile static`", p.get("compiled_modes"))):
            m = (modes or {}).get("maskedkd_50")
            if m is not None:
                out.append(
                    Target(
                        f"training{label}: MaskedKD-50 speedup over full KD / FLOP-model prediction",
                        p["pair"],
                        m["of_predicted"],
                        ">=",
                        0.95,
                        f"measured {m['speedup_vs_full_kd']:.2f}x ({modes['full_kd']['step_s'] * 1e3:.0f} -> "
                        f"{m['step_s'] * 1e3:.0f} ms/step) vs predicted {m['predicted_speedup_vs_full_kd']:.2f}x",
                    )
                )
    return out


def gpu_targets(section: dict[str, Any]) -> list[Target]:
    out = []
    for m in section.get("models", []):
        if m["model"] != "vit_b_224":
            continue
        for r in m["rows"]:
            share = r["of_spec_peak"] if r["of_spec_peak"] is not None else r["of_matmul"]
            basis = "spec peak" if r["of_spec_peak"] is not None else "measured bf16 matmul (card not in table)"
            out.append(
                Target(
                    "GPU (aim): ViT-B bf16 masked forward / peak",
                    f"{m['model']} {_pct(r['keep'])}",
                    share,
                    ">=",
                    0.50,
                    f"{r['tflops_per_s']:.1f} TFLOP/s vs {basis}",
                )
            )
    return out


BF16_FORWARD_KEEPS = (1.0, 0.5, 0.25)


def precision_targets(precision: dict[str, Any], teacher: dict[str, Any] | None) -> list[Target]:
    """The bf16 targets: they apply only where the machine computes bf16 natively; elsewhere N/A with the numbers."""
    out: list[Target] = []
    native, rates = precision["native_bf16"], precision["rates"]
    served = precision["served_dtype"]
    machine = (
        f"{served} served; matmul fp32 {rates['float32']:.1f}, bf16 {rates['bfloat16']:.2f} GFLOP/s "
        f"(bf16 = {precision['bf16_vs_fp32']:.3f}x fp32; {precision['why']})"
    )
    na = f"{NOT_NATIVE_PREFIX}: " if not native else ""
    deit = next((m for m in (teacher or {}).get("models", []) if m["model"] == "deit_s_224"), None)
    for r in (deit or {}).get("rows", []):
        if r["keep"] in BF16_FORWARD_KEEPS:
            share = r["grpc_gflops_per_s"] / rates["bfloat16"]
            out.append(
                Target(
                    "bf16: default server forward / bf16 matmul rate",
                    f"deit_s_224 {_pct(r['keep'])}",
                    share,
                    ">=",
                    0.60,
                    f"{na}server {r['grpc_gflops_per_s']:.1f} GFLOP/s; {machine}",
                    applicable=native and served == "bfloat16",
                )
            )
    vs_fp32 = precision.get("default_vs_fp32_server")
    out.append(
        Target(
            "bf16: default server / fp32 server throughput",
            "deit_s_224 keep 50%",
            vs_fp32["ratio"] if vs_fp32 else 1.0,
            ">=",
            2.3,
            f"{na}default {vs_fp32['default_images_per_s']:.1f} vs fp32 {vs_fp32['fp32_images_per_s']:.1f} "
            f"img/s; {machine}"
            if vs_fp32
            else f"{na}the default resolves to {served}, the same server as "
            f"an fp32 one (ratio 1 by construction); {machine}",
            applicable=native and vs_fp32 is not None,
        )
    )
    train = precision.get("training")
    if train is not None:
        st = train["steps"]
        out.append(
            Target(
                "bf16: MaskedKD-50 training step, fp32 step / bf16 step",
                train["pair"],
                train["bf16_speedup"],
                ">=",
                2.0,
                f"{na}fp32 {st['fp32']['step_s'] * 1e3:.0f} ms vs bf16 {st['bf16']['step_s'] * 1e3:.0f} ms "
                f"per step, batch {train['batch_size']}{_alone(train)}; {machine}",
                applicable=native,
            )
        )
    return out


def _alone(train: dict[str, Any]) -> str:
    """The student's own step in each precision (no KD), where the run timed it."""
    alone = train.get("student_alone")
    if not alone:
        return ""
    return (
        f" (the student alone: fp32 {alone['fp32']['step_s'] * 1e3:.0f} vs bf16 "
        f"{alone['bf16']['step_s'] * 1e3:.0f} ms, {train['student_alone_bf16_speedup']:.2f}x)"
    )


def serving_targets(section: dict[str, Any]) -> list[Target]:
    """Server CPU above the in-process forward, per image, with a negligible teacher of DeiT-S geometry."""
    return [
        Target(
            "serving overhead: server CPU-us per image above the in-process forward",
            f"{r['clients']} clients x {r['batch']} images, keep 50%"
            + (", pixels in shared memory" if r.get("shared_memory") else "")
            + (f", {r['ingest_workers']} ingest workers" if r.get("ingest_workers") else ""),
            r["overhead_us"],
            "<=",
            60.0,
            f"server {r['server_cpu_us']:.0f} us/img, forward {r['forward_cpu_us']:.0f} us/img, "
            f"{r['images_per_s']:.0f} img/s through the server"
            + (
                f"; a bare gRPC server answering the same calls: {r['floor_us']:.0f} us/img"
                if r.get("floor_us")
                else ""
            ),
        )
        for r in section["rows"]
    ]


FLOOD_NEVER_RAN = "not applicable: the flood never ran on this machine"


def tenants_targets(section: dict[str, Any]) -> list[Target]:
    """Both targets need the greedy key's calls to run. Their size is fitted to the machine (`sized_greedy_images`),
    but where every one was still refused for its 1 s deadline, no greedy forward ran and nothing was billed, so
    neither ratio says anything: N/A, with what was measured."""
    light, greedy = section["light"], section["greedy"]
    errors = sum(light["flood"]["errors"].values())
    ran = greedy["answered"] > 0 or greedy["billed"] > 0  # a greedy forward ran (billed: also one answered late)
    na = "" if ran else f"{FLOOD_NEVER_RAN} (every greedy call refused for its deadline): "
    return [
        Target(
            "tenant isolation: light key's p99 under a 16-client flood / alone",
            "tiny 32 px teacher",
            light["p99_ratio"],
            "<=",
            2.0,
            f"{na}p99 {light['flood']['p99_ms']:.0f} ms under the flood vs {light['alone']['p99_ms']:.0f} ms alone; "
            f"{errors} light errors under the flood; {greedy['answered']} of {greedy['sent']} greedy "
            f"{greedy['images']}-image calls answered",
            applicable=ran,
        ),
        Target(
            "billed but undelivered: greedy requests answered after their client gave up / billed",
            "1 s deadline, no retries",
            greedy["billed_undelivered"] / max(greedy["billed"], 1),
            "<=",
            0.01,
            f"{na}{greedy['billed_undelivered']} of {greedy['billed']} billed; {greedy['answered']} answered of "
            f"{greedy['sent']} sent",
            applicable=ran,
        ),
    ]


def all_targets(results: dict[str, Any]) -> list[Target]:
    sections = results["sections"]
    ok = lambda name: sections.get(name, {}).get("status") == "ok"  # noqa: E731
    out: list[Target] = []
    if ok("teacher"):
        out += teacher_targets(sections["teacher"])
    if ok("wire"):
        out += wire_targets(sections["wire"])
    if ok("microbatch"):
        out += microbatch_targets(sections["microbatch"])
    if ok("training"):
        out += training_targets(sections["training"])
    if ok("gpu"):
        out += gpu_targets(sections["gpu"])
    if ok("serving"):
        out += serving_targets(sections["serving"])
    if ok("tenants"):
        out += tenants_targets(sections["tenants"])
    if ok("precision"):
        out += precision_targets(sections["precision"], sections["teacher"] if ok("teacher") else None)
    return out
