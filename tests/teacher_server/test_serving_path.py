"""The serving path's cheaper parts stay exact: a CPU teacher's forward in cache-sized chunks gives the one-call
forward's logits; a batch's usage rows and replay payloads, inserted as Core statements, are each other's (read back
with SQL); a new SQLite ledger gets 16 KiB pages while an existing file keeps its own and bills on."""

from __future__ import annotations

import sqlite3

import pytest
import service_testkit as kit
import torch
from postgres_testkit import pg_rows, postgres_server, postgres_url  # noqa: F401 (fixtures)

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.served_model import in_cache_chunks, make_forward
from teacher_server.ledger import billing, database, keys

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]


def _rows(teacher: MaskedTeacher, batch: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 kept patches [B, K, C, P, P] and their positions [B, K], as the server stages them."""
    g = torch.Generator().manual_seed(seed)
    geo = teacher.geometry
    pixels = torch.randint(
        0, 256, (batch, k, geo.in_chans, geo.patch_size, geo.patch_size), dtype=torch.uint8, generator=g
    )
    idx = torch.stack([torch.randperm(geo.num_patches, generator=g)[:k].sort().values for _ in range(batch)])
    return pixels, idx


def test_chunks_run_in_order_over_every_row_with_their_own_counts() -> None:
    """float32 on the CPU: 10 rows of 7 tokens (6 kept + 1 prefix) with a budget of 28 tokens run as 4 + 4 + 2 rows,
    each chunk with its rows' own counts, and the answers come back in row order."""
    pixels = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1, 1).expand(10, 6, 1, 1, 1)
    idx = torch.zeros(10, 6, dtype=torch.int64)
    counts = torch.tensor([6, 5, 6, 4, 6, 6, 3, 6, 6, 2])
    seen: list[tuple[int, list[int]]] = []

    def forward(p: torch.Tensor, i: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        assert c is not None
        seen.append((p.shape[0], c.tolist()))
        return torch.stack([p[:, 0, 0, 0, 0], c.float()], dim=1)  # [G, 2]: the row's pixel value and its count

    out = in_cache_chunks(forward, pixels, idx, counts, 1, chunk_tokens=28)
    assert [n for n, _ in seen] == [4, 4, 2]
    assert [c for _, chunk in seen for c in chunk] == counts.tolist()
    assert out[:, 0].tolist() == list(range(10)) and out[:, 1].tolist() == counts.float().tolist()


@pytest.mark.parametrize("ragged", [False, True])
def test_a_cpu_forward_in_chunks_equals_the_forward_of_the_whole_batch(ragged: bool) -> None:
    """float32 on the CPU, the tiny ViT: 300 rows of keep 24 run in chunks of 2048 // 25 = 81 rows; each row's logits
    equal those of one forward over all 300 (ragged: padded rows with their counts)."""
    torch.manual_seed(0)
    teacher = MaskedTeacher(kit.tiny_vit(seed=3)).eval()
    pixels, idx = _rows(teacher, 300, 24, seed=4)
    counts = torch.randint(1, 25, (300,), generator=torch.Generator().manual_seed(5)) if ragged else None
    forward = make_forward(teacher, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        chunked = forward(pixels, idx, counts)
        whole = teacher.forward_pixels(pixels, idx, counts).float()
    assert chunked.shape == whole.shape == (300, teacher.geometry.num_classes)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def _bill_three(url: str) -> dict[str, bytes]:
    sessions = database.open_ledger(url)
    with sessions() as s:
        key = keys.add_api_key(s, name="k", key_prefix="mkd_x", key_hash="h" * 64)
    payloads = {rid: bytes([i]) * (8 * (i + 1)) for i, rid in enumerate(("zeta", "alpha", "mid"))}
    items = [
        kit.billable(key.id, rid, 1.0 + i, digest="d" * 64, payload=(data, f"1,{2 * (i + 1)}"))
        for i, (rid, data) in enumerate(payloads.items())
    ]
    with sessions() as s:  # inserted in (key, request_id) order, not the order given
        assert billing.bill(s, items=items, replay_ttl_s=60) == [None, None, None]
    sessions.kw["bind"].dispose()
    return payloads


def test_each_replay_payload_belongs_to_its_own_usage_row_sqlite(tmp_path) -> None:
    """float32 payload bytes, SQLite: the rows are inserted in another order than given; SQL joins each payload to the
    row of the request that produced it."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    payloads = _bill_three(url)
    with sqlite3.connect(tmp_path / "l.db") as conn:
        joined = conn.execute(
            "SELECT u.request_id, p.logits FROM usage u JOIN replay_payloads p ON p.usage_id = u.id"
        ).fetchall()
    assert dict(joined) == payloads


def test_each_replay_payload_belongs_to_its_own_usage_row_postgres(postgres_url: str) -> None:  # noqa: F811
    """The same on PostgreSQL (its RETURNING of a many-row insert), read back with psycopg2."""
    payloads = _bill_three(postgres_url)
    joined = pg_rows(
        postgres_url, "SELECT u.request_id, p.logits FROM usage u JOIN replay_payloads p ON p.usage_id = u.id"
    )
    assert {rid: bytes(data) for rid, data in joined} == payloads


def test_a_new_sqlite_ledger_has_16k_pages_and_an_old_file_keeps_its_own(tmp_path) -> None:
    """No tensors: the page size read back with sqlite3; a file created with 4 KiB pages is migrated and bills on."""
    database.open_ledger(f"sqlite:///{tmp_path / 'new.db'}").kw["bind"].dispose()
    with sqlite3.connect(tmp_path / "new.db") as conn:
        assert conn.execute("PRAGMA page_size").fetchone() == (database.SQLITE_PAGE_SIZE,)
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("PRAGMA page_size=4096")
        conn.execute("PRAGMA journal_mode=WAL")  # writes the header: the page size is the file's from here
    payloads = _bill_three(f"sqlite:///{tmp_path / 'old.db'}")
    with sqlite3.connect(tmp_path / "old.db") as conn:
        assert conn.execute("PRAGMA page_size").fetchone() == (4096,)
        assert conn.execute("SELECT COUNT(*) FROM replay_payloads").fetchone() == (len(payloads),)
