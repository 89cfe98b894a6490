"""`teacher-server` as a user runs it, in subprocesses: keys create/list/disable, usage, and serve from a checkpoint
written by save_model_checkpoint, answering a call from this process, stopped by SIGTERM."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import urllib.request
from pathlib import Path

import pytest
import service_testkit as kit
import torch
from dtype_marks import child_env

from maskedkd.checkpoints import save_model_checkpoint
from maskedkd.precision import dtype_name, resolve_dtype
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.launcher import ServerProcess, serve_argv, teacher_server_command

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(180)]

CLI = teacher_server_command()  # the console script a user runs


def run_cli(*args: str, db: str) -> subprocess.CompletedProcess[str]:
    env = child_env()
    return subprocess.run([*CLI, *args, "--db", db], capture_output=True, text=True, timeout=60, env=env)


def test_keys_and_usage_commands(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    created = run_cli("keys", "create", "--name", "grace", "--quota-gflops", "12.5", "--price-per-gflop", "0.2", db=db)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert re.fullmatch(r"mkd_[A-Za-z0-9_-]{43}", secret)
    assert "shown only once" in created.stderr

    listed = run_cli("keys", "list", "--json", db=db)
    assert listed.returncode == 0 and secret not in listed.stdout
    (entry,) = json.loads(listed.stdout)
    assert (entry["name"], entry["prefix"], entry["disabled"], entry["quota_gflops"], entry["price_per_gflop"]) == (
        "grace",
        secret[:12],
        False,
        12.5,
        0.2,
    )
    table = run_cli("keys", "list", db=db)
    assert "grace" in table.stdout and secret not in table.stdout and "active" in table.stdout

    duplicate = run_cli("keys", "create", "--name", "grace", db=db)
    assert duplicate.returncode == 2 and duplicate.stdout == ""
    assert duplicate.stderr.count("\n") == 1 and "already exists" in duplicate.stderr

    assert run_cli("keys", "disable", "grace", db=db).returncode == 0
    assert json.loads(run_cli("keys", "list", "--json", db=db).stdout)[0]["disabled"] is True
    missing = run_cli("keys", "disable", "nobody", db=db)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nobody" in missing.stderr

    (unused,) = json.loads(run_cli("usage", "--json", db=db).stdout)
    expected = {
        "key": "grace",
        "requests": 0,
        "images": 0,
        "tokens": 0,
        "gflops": 0.0,
        "full_gflops": 0.0,
        "saving_pct": 0.0,
        "cost": 0.0,
        "billed": [],
        "by_purpose": [],
        "refused": {},
        "disabled": True,
        "price_per_gflop": 0.2,
    }
    assert {k: unused[k] for k in expected} == expected
    unknown = run_cli("usage", "--key", "nobody", db=db)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    bad_flag = run_cli("keys", "create", "--name", "x", "--quota-gflops", "lots", db=db)
    assert bad_flag.returncode == 2 and bad_flag.stderr.count("\n") == 1 and "--quota-gflops" in bad_flag.stderr


@pytest.mark.dtype("none")  # the ledger only
@pytest.mark.parametrize(
    "command",
    [("keys", "list"), ("keys", "disable", "grace"), ("keys", "quota", "grace", "--quota-gflops", "5"),
     ("ledger", "purge")],
    ids=["list", "disable", "quota", "purge"],
)  # fmt: skip
def test_commands_on_a_ledger_that_does_not_exist_refuse_it_and_create_nothing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A typo in --db must not read as an empty ledger (no keys, "no key named ..."), nor leave a new file behind:
    every command but `keys create`, `ledger upgrade` and `serve` needs the ledger to exist. Checks no tensors."""
    typo = tmp_path / "ledgr.db"
    result = run_cli(*command, db=f"sqlite:///{typo}")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"teacher-server: error: no ledger at {typo} " + (
        "(check --db or MASKEDKD_DB; `teacher-server serve` or `keys create` starts one)")]  # fmt: skip
    assert not typo.exists()


def sql(db: str, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        return conn.execute(query).fetchall()


def test_keys_price_and_enable_change_the_ledger(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert run_cli("keys", "create", "--name", "ivan", "--price-per-gflop", "3e-6", db=db).returncode == 0
    key_row = "SELECT price_per_gflop, disabled, quota_gflops FROM api_keys WHERE name = 'ivan'"

    priced = run_cli("keys", "price", "ivan", "--price-per-gflop", "7.5e-6", db=db)
    assert priced.returncode == 0 and "7.5e-06" in priced.stdout, priced.stderr
    assert sql(db, key_row) == [(7.5e-6, 0, None)]
    assert run_cli("keys", "price", "ivan", "--price-per-gflop", "default", db=db).returncode == 0
    assert sql(db, key_row) == [(None, 0, None)]  # back to the serving server's price

    assert run_cli("keys", "disable", "ivan", db=db).returncode == 0
    assert sql(db, key_row) == [(None, 1, None)]
    enabled = run_cli("keys", "enable", "ivan", db=db)
    assert enabled.returncode == 0 and enabled.stdout.strip() == "enabled key 'ivan'", enabled.stderr
    assert sql(db, key_row) == [(None, 0, None)]

    before = sql(db, "SELECT * FROM api_keys")
    for bad, says in (
        (("keys", "price", "ivan", "--price-per-gflop", "-1"), "price_per_gflop must be >= 0"),
        (("keys", "price", "ivan", "--price-per-gflop", "nan"), "finite"),
        (("keys", "price", "ivan", "--price-per-gflop", "cheap"), "--price-per-gflop"),
        (("keys", "price", "nobody", "--price-per-gflop", "1"), "no API key named 'nobody'"),
        (("keys", "enable", "nobody"), "no API key named 'nobody'"),
        (("keys", "enable"), "needs a key name"),
    ):
        refused = run_cli(*bad, db=db)
        assert refused.returncode == 2 and refused.stdout == "", bad
        assert refused.stderr.count("\n") == 1 and says in refused.stderr and "Traceback" not in refused.stderr, bad
    assert sql(db, "SELECT * FROM api_keys") == before


def test_keys_share_sets_weight_and_priority_and_refuses_bad_values(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    created = run_cli("keys", "create", "--name", "ops", "--weight", "3", "--priority", "interactive", db=db)
    assert created.returncode == 0, created.stderr
    assert run_cli("keys", "create", "--name", "etl", db=db).returncode == 0
    share_row = "SELECT name, weight, priority FROM api_keys ORDER BY name"
    assert sql(db, share_row) == [("etl", 1.0, "standard"), ("ops", 3.0, "interactive")]

    shared = run_cli("keys", "share", "etl", "--weight", "0.5", "--priority", "batch", db=db)
    assert shared.returncode == 0 and "weight 0.5, priority batch" in shared.stdout, shared.stderr
    assert sql(db, share_row) == [("etl", 0.5, "batch"), ("ops", 3.0, "interactive")]
    listed = {k["name"]: k for k in json.loads(run_cli("keys", "list", "--json", db=db).stdout)}
    assert (listed["etl"]["weight"], listed["etl"]["priority"]) == (0.5, "batch")

    for bad, says in (
        (("keys", "share", "etl", "--weight", "0", "--priority", "batch"), "--weight"),
        (("keys", "share", "etl", "--weight", "1", "--priority", "urgent"), "--priority"),
        (("keys", "share", "nobody", "--weight", "1", "--priority", "batch"), "no API key named 'nobody'"),
    ):
        refused = run_cli(*bad, db=db)
        assert refused.returncode == 2 and refused.stdout == "", bad
        assert refused.stderr.count("\n") == 1 and says in refused.stderr and "Traceback" not in refused.stderr, bad
    assert sql(db, share_row) == [("etl", 0.5, "batch"), ("ops", 3.0, "interactive")]


@pytest.mark.dtype("auto")  # default flags: the dtype auto picks here, compared at that dtype's tolerance
def test_serve_from_a_checkpoint_answers_a_call_and_stops_on_sigterm(tmp_path: Path) -> None:
    model = kit.tiny_vit(seed=3)
    ckpt = save_model_checkpoint(tmp_path / "teacher.safetensors", model, model_name=kit.MODEL, model_kwargs=kit.TINY)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    secret = run_cli("keys", "create", "--name", "heidi", db=db).stdout.strip()
    server = ServerProcess(
        serve_argv("--checkpoint", str(ckpt), "--port", "0", "--metrics-port", "0", "--db", db, "--max-delay-ms", "1"),
        log=tmp_path / "serve.log",
        env=child_env(),
    )
    with server:
        assert server.ready is not None and server.ready.models == (kit.MODEL,)  # from the checkpoint's metadata alone
        channel, teacher = kit.stub(server.address)
        images, keep = kit.random_images(2, 8), kit.random_keep(2, 16, 8)
        response = teacher.Infer(kit.image_request(images, keep, request_id="cli-1"), metadata=kit.auth(secret))
        served_dtype = teacher.GetModelInfo(pb.ModelInfoRequest()).dtype
        assert served_dtype == dtype_name(resolve_dtype("auto", "cpu")[0])  # what auto resolves to in this test
        ref = kit.Reference(model)
        torch.testing.assert_close(kit.logits_of(response), ref.logits(images, keep), **kit.SERVED_CLOSE[served_dtype])
        assert response.usage.gflops == ref.gflops([16, 16])
        metrics = urllib.request.urlopen(server.ready.metrics_url, timeout=10).read().decode()
        assert "maskedkd_gflops_used_total" in metrics
        channel.close()
        assert server.stop() == 0  # SIGTERM: a graceful stop
    log = (tmp_path / "serve.log").read_text()
    assert "teacher-server: stopped" in log and "Traceback" not in log

    (totals,) = json.loads(run_cli("usage", "--key", "heidi", "--json", db=db).stdout)
    assert (totals["requests"], totals["images"], totals["gflops"], totals["cost"]) == (
        1,
        2,
        response.usage.gflops,
        response.usage.cost,
    )
    assert totals["saving_pct"] == pytest.approx(100 * (1 - response.usage.gflops / response.usage.full_gflops))
    text = run_cli("usage", db=db).stdout
    assert "heidi" in text and "%" in text


def test_serve_errors_are_one_line(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    no_model = run_cli("serve", "--port", "0", db=db)
    assert no_model.returncode == 2 and no_model.stderr.count("\n") == 1 and "--model" in no_model.stderr
    bad_json = run_cli("serve", "--model", kit.MODEL, "--model-kwargs", "{img_size: 32}", db=db)
    assert bad_json.returncode == 2 and "--model-kwargs" in bad_json.stderr and "Traceback" not in bad_json.stderr
