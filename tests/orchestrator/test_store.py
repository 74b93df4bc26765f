"""Tests of the SQL store; every test taking the store fixture runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pg import find_postgres_bin

from edgefleet.common.hardware import Accelerator, HardwareProfile, RuntimeInfo
from edgefleet.common.models import ModelMetadata, TensorSpec
from edgefleet.orchestrator.domain import (
    Assignment,
    IdentityConflict,
    MetricWindow,
    ModelStatus,
    ModelVersion,
    Variant,
)
from edgefleet.orchestrator.store import (
    AlreadyExistsError,
    IdentityMismatchError,
    NotFoundError,
    Store,
    StoreError,
    codec,
    open_store,
    sql,
)
from edgefleet.orchestrator.store import engine as engine_module
from edgefleet.orchestrator.store.base import DeviceRemovedError
from edgefleet.orchestrator.store.engine import (
    MigrationError,
    alembic_config,
    create_store_engine,
    migration_transaction,
)
from edgefleet.orchestrator.store.schema import metadata as store_metadata
from edgefleet.orchestrator.store.sql import SqlStore

NOW = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
KEY_A = "a1" * 32
KEY_B = "b2" * 32


def _profile(**changes: Any) -> HardwareProfile:
    profile = HardwareProfile(
        cpu_model="Cortex-A76",
        architecture="aarch64",
        logical_cores=4,
        usable_cores=3.5,
        cpu_features=("asimd", "dotprod"),
        memory_total_bytes=8 << 30,
        memory_available_bytes=6 << 30,
        disk_free_bytes=20 << 30,
        accelerators=(
            Accelerator(kind="npu", vendor="rockchip", name="rknpu", device_path="/dev/rknpu", memory_bytes=1 << 20),
        ),
        runtimes=(
            RuntimeInfo(name="onnxruntime", version="1.32.0", providers=("CPUExecutionProvider",)),
            RuntimeInfo(name="litert", version="2.3.0", providers=("xnnpack",)),
        ),
        os="Debian 12",
        kernel="6.1.0",
        profile_name="rpi5",
        hardware_class="rpi5-3.5c-8192m-0123abcd",
    )
    return dataclasses.replace(profile, **changes)


def _metadata(precision: str = "fp32") -> ModelMetadata:
    return ModelMetadata(
        format="onnx",
        inputs=(TensorSpec(name="image", dtype="float32", shape=(-1, 3, 224, 224), dim_names=("batch", "", "", "")),),
        outputs=(TensorSpec(name="logits", dtype="int8", shape=(-1, 1000), scale=0.05, zero_point=-3),),
        opset=17,
        parameters=4_650_000,
        macs=400_000_000,
        peak_activation_bytes=3_000_000,
        macs_by_op_type={"Conv": 390_000_000, "Gemm": 10_000_000},
        precision=precision,
        layers=60,
    )


def _model(version: str = "1", digest: str = "sha256:" + "1" * 64, created_at: datetime = NOW) -> ModelVersion:
    return ModelVersion(
        name="effnet",
        version=version,
        digest=digest,
        size_bytes=18_000_000,
        metadata=_metadata(),
        created_at=created_at,
    )


def _variant(variant_id: str = "effnet-1-source", version: str = "1", **changes: Any) -> Variant:
    variant = Variant(
        variant_id=variant_id,
        model_name="effnet",
        model_version=version,
        kind="source",
        format="onnx",
        precision="fp32",
        digest="sha256:" + "1" * 64,
        size_bytes=18_000_000,
        metadata=_metadata(),
    )
    return dataclasses.replace(variant, **changes)


def _register(store: Store, device_id: str = "dev-1", key: str = KEY_A, now: datetime = NOW, **changes: Any) -> Any:
    arguments: dict[str, Any] = {
        "device_id": device_id,
        "instance_key_hash": key,
        "hardware": _profile(),
        "labels": {"site": "lab", "rack": "3"},
        "agent_version": "0.1.0",
        "peer": "ipv4:127.0.0.1:50000",
        "now": now,
    }
    arguments.update(changes)
    return store.register_device(**arguments)


def _assignment(variant: Variant, device_id: str = "dev-1", **changes: Any) -> Assignment:
    assignment = Assignment(
        device_id=device_id,
        model_name=variant.model_name,
        model_version=variant.model_version,
        variant_id=variant.variant_id,
        digest=variant.digest,
        size_bytes=variant.size_bytes,
        format=variant.format,
        threads=2,
        rollout_id="rollout-1",
    )
    return dataclasses.replace(assignment, **changes)


def _status(model_name: str = "effnet", state: str = "serving", **changes: Any) -> ModelStatus:
    status = ModelStatus(
        device_id="dev-1",
        model_name=model_name,
        model_version="1",
        variant_id="effnet-1-source",
        digest="sha256:" + "1" * 64,
        state=state,
        runtime="onnxruntime",
        providers=("CPUExecutionProvider",),
        threads=2,
    )
    return dataclasses.replace(status, **changes)


def _window(device_id: str = "dev-1", minute: int = 0, **changes: Any) -> MetricWindow:
    window = MetricWindow(
        device_id=device_id,
        model_name="effnet",
        model_version="1",
        variant_id="effnet-1-source",
        hardware_class="rpi5-3.5c-8192m-0123abcd",
        window_start=NOW + timedelta(minutes=minute),
        window_seconds=60,
        received_at=NOW + timedelta(minutes=minute + 1),
        inference_count=100,
        error_count=1,
        sketch=b"\x08\x01\x12\x00",
    )
    return dataclasses.replace(window, **changes)


@pytest.fixture
def empty_db_url(request: pytest.FixtureRequest, db_url: str, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of a database without tables, on the backend of db_url."""
    if db_url.startswith("sqlite"):
        # db_url is a copy of a migrated database, so the empty one is a new file.
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    cluster = request.getfixturevalue("postgres_cluster")
    name = "empty_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_").lower()[:40]
    yield cluster.create_database(name)
    cluster.drop_database(name)


# Codec


def test_codec_hardware_roundtrip() -> None:
    profile = _profile()
    assert codec.hardware_from_dict(codec.hardware_to_dict(profile)) == profile


def test_codec_metadata_roundtrip() -> None:
    metadata = _metadata()
    assert codec.metadata_from_dict(codec.metadata_to_dict(metadata)) == metadata


def test_codec_integer_float() -> None:
    data = codec.hardware_to_dict(_profile(usable_cores=4.0))
    data["usable_cores"] = 4
    assert isinstance(codec.hardware_from_dict(data).usable_cores, float)


def test_codec_missing_default() -> None:
    data = codec.hardware_to_dict(_profile())
    del data["profile_name"]
    assert codec.hardware_from_dict(data).profile_name == ""


def test_codec_missing_required() -> None:
    data = codec.hardware_to_dict(_profile())
    del data["cpu_model"]
    with pytest.raises(ValueError, match="cpu_model"):
        codec.hardware_from_dict(data)


def test_codec_wrong_type() -> None:
    data = codec.hardware_to_dict(_profile())
    data["logical_cores"] = "four"
    with pytest.raises(ValueError, match="logical_cores"):
        codec.hardware_from_dict(data)


def test_codec_canonical_key_order() -> None:
    assert codec.canonical_json({"b": 1, "a": [1, 2]}) == codec.canonical_json({"a": [1, 2], "b": 1})


def test_codec_identity_ignores_volatile() -> None:
    changed = _profile(memory_available_bytes=1, disk_free_bytes=2)
    assert codec.hardware_identity(changed) == codec.hardware_identity(_profile())


# Test cluster helper


def test_find_postgres_bin_newest(tmp_path: Path) -> None:
    for version in ("9.6", "13", "15", "notaversion"):
        bin_dir = tmp_path / version / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "initdb").touch()
    (tmp_path / "16").mkdir()  # No initdb: a leftover directory, not an installation.
    assert find_postgres_bin(tmp_path) == tmp_path / "15" / "bin"


def test_find_postgres_bin_absent(tmp_path: Path) -> None:
    assert find_postgres_bin(tmp_path / "missing") is None


# Opening and migrations


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "mysql+pymysql://user@localhost/db",
        "postgresql+psycopg2://user@localhost/db",
        "not a url",
    ],
)
def test_open_store_rejects_url(url: str) -> None:
    with pytest.raises(ValueError, match=r"sqlite:///PATH|postgresql\+psycopg"):
        open_store(url)


def test_open_store_creates_parent(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nested" / "edgefleet.db"
    open_store(f"sqlite:///{path}").close()
    assert path.is_file()


def test_open_store_plain_postgresql_url(postgres_url: str) -> None:
    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    store = open_store(plain)
    try:
        assert store.list_devices() == []
    finally:
        store.close()


def test_sqlite_connection_pragmas(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'edgefleet.db'}")
    assert isinstance(store, SqlStore)
    try:
        with store.engine.connect() as connection:
            journal_mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
            foreign_keys = connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
            busy_timeout = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
    finally:
        store.close()
    assert journal_mode == "wal"
    assert foreign_keys == 1
    assert busy_timeout == 30_000


def test_migration_reaches_head(empty_db_url: str) -> None:
    open_store(empty_db_url).close()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    engine = create_store_engine(empty_db_url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    assert current == head


def test_migration_matches_models(empty_db_url: str) -> None:
    open_store(empty_db_url).close()
    engine = create_store_engine(empty_db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, store_metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_migration_downgrade_upgrade(empty_db_url: str) -> None:
    open_store(empty_db_url).close()
    engine = create_store_engine(empty_db_url)
    config = alembic_config()
    try:
        with migration_transaction(engine) as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        with engine.connect() as connection:
            tables_after_downgrade = set(sa.inspect(connection).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()
    assert tables_after_downgrade == set()

    store = open_store(empty_db_url)
    try:
        assert store.list_devices() == []
    finally:
        store.close()


def _downgrade(db_url: str, revision: str) -> None:
    """Take the schema of the database at db_url down to revision, as an older release left it."""
    engine = create_store_engine(db_url)
    config = alembic_config()
    try:
        with migration_transaction(engine) as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, revision)
    finally:
        engine.dispose()


def test_migration_keeps_windows_of_removed(empty_db_url: str) -> None:
    """Windows stored before the metric tables lost their device foreign key survive the removal of the device."""
    store = open_store(empty_db_url)
    try:
        _register(store)
        store.add_metric_batch("dev-1", "batch-1", [_window()])
    finally:
        store.close()
    _downgrade(empty_db_url, "20261204_received_at")

    store = open_store(empty_db_url)
    try:
        store.remove_device("dev-1", NOW)
        windows = store.query_metric_windows(device_id="dev-1")
        removed = store.get_removed_device("dev-1")
    finally:
        store.close()

    assert [w.device_id for w in windows] == ["dev-1"]
    assert removed is not None
    assert removed.instance_key_hash == KEY_A


def test_migration_fills_accuracy_drop(empty_db_url: str) -> None:
    """Variants stored before the drop was kept get it where their figure allows: sources and agreement."""
    store = open_store(empty_db_url)
    try:
        store.add_model_version(_model(), _variant())
        store.add_variant(_variant("effnet-1-int8", kind="int8", accuracy=0.97, accuracy_metric="top1_agreement"))
        store.add_variant(_variant("effnet-1-pruned", kind="pruned", accuracy=0.91, accuracy_metric="top1"))
    finally:
        store.close()
    _downgrade(empty_db_url, "20261205_removed_generation")

    store = open_store(empty_db_url)
    try:
        drops = {v: store.get_variant(v).accuracy_drop for v in ("effnet-1-source", "effnet-1-int8", "effnet-1-pruned")}
    finally:
        store.close()

    assert drops["effnet-1-source"] == 0.0
    assert drops["effnet-1-int8"] == pytest.approx(3.0)
    assert drops["effnet-1-pruned"] is None


# The revision before 20261205_trusted_keys, whose downgrade rebuilds the devices table on SQLite.
BEFORE_TRUSTED_KEYS = "20261205_accuracy_drop"


def _populate_fleet(db_url: str) -> None:
    """Store a device with labels, two hardware profiles, an assignment, statuses and an identity conflict."""
    store = open_store(db_url)
    try:
        _register(store)
        _register(store, now=NOW + timedelta(hours=1), hardware=_profile(memory_total_bytes=16 << 30))
        store.add_model_version(_model(), _variant())
        store.set_assignment(_assignment(store.get_variant("effnet-1-source")))
        store.save_reported_state("dev-1", 1, [_status(), _status("mobilenet", "failed", error="oom")], NOW)
        store.record_identity_conflict(IdentityConflict("dev-1", KEY_B[:12], "ipv4:10.0.0.9:1234", NOW))
    finally:
        store.close()


def _row_counts(db_url: str) -> dict[str, int]:
    """Return the row count of every table but alembic_version."""
    engine = create_store_engine(db_url)
    try:
        with engine.connect() as connection:
            names = set(sa.inspect(connection).get_table_names()) - {"alembic_version"}
            return {
                name: connection.execute(sa.select(sa.func.count()).select_from(sa.table(name))).scalar_one()
                for name in sorted(names)
            }
    finally:
        engine.dispose()


def _alembic_command(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the alembic command with the shipped alembic.ini on db_url, as a developer does."""
    ini = Path(alembic_config().config_file_name or "")
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), "-x", f"url={db_url}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_alembic_downgrade_keeps_rows(empty_db_url: str) -> None:
    """A downgrade that rebuilds the devices table keeps the rows of the tables that reference it."""
    _populate_fleet(empty_db_url)
    before = _row_counts(empty_db_url)

    result = _alembic_command(empty_db_url, "downgrade", BEFORE_TRUSTED_KEYS)
    after_downgrade = _row_counts(empty_db_url)
    open_store(empty_db_url).close()
    after_upgrade = _row_counts(empty_db_url)

    assert result.returncode == 0, result.stderr
    for table in ("devices", "device_labels", "hardware_profiles", "assignments", "model_statuses"):
        assert before[table] > 0, table
    assert before["identity_conflicts"] == 1
    assert after_downgrade == before
    assert after_upgrade == before


def test_sqlite_table_rebuild_keeps_rows(tmp_path: Path) -> None:
    """A batch-mode rebuild of the devices table in a migration transaction deletes no referencing rows."""
    db_url = f"sqlite:///{tmp_path / 'edgefleet.db'}"
    _populate_fleet(db_url)
    before = _row_counts(db_url)

    engine = create_store_engine(db_url)
    try:
        with migration_transaction(engine) as connection:
            operations = Operations(MigrationContext.configure(connection))
            with operations.batch_alter_table("devices", recreate="always"):
                pass
        with engine.connect() as connection:
            foreign_keys = connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
    finally:
        engine.dispose()

    assert _row_counts(db_url) == before
    assert foreign_keys == 1


def test_sqlite_migration_foreign_key_violation(tmp_path: Path) -> None:
    """A migration that leaves a row without its parent is rolled back with an error naming the row."""
    db_url = f"sqlite:///{tmp_path / 'edgefleet.db'}"
    _populate_fleet(db_url)
    before = _row_counts(db_url)

    engine = create_store_engine(db_url)
    try:
        violation = pytest.raises(MigrationError, match=r"device_labels row 1 references devices")
        with violation as raised, migration_transaction(engine) as connection:
            connection.execute(sa.text("UPDATE device_labels SET device_id = 'dev-missing' WHERE rowid = 1"))
        with engine.connect() as connection:
            foreign_keys = connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
    finally:
        engine.dispose()

    assert "rolled back" in str(raised.value)
    assert _row_counts(db_url) == before
    assert foreign_keys == 1


def test_alembic_rejects_sqlite_foreign_keys_on(tmp_path: Path) -> None:
    """Migrating a SQLite connection that enforces foreign keys fails before any step runs."""
    db_url = f"sqlite:///{tmp_path / 'edgefleet.db'}"
    _populate_fleet(db_url)
    engine = create_store_engine(db_url)
    config = alembic_config()
    try:
        with pytest.raises(RuntimeError, match="foreign keys"), engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, BEFORE_TRUSTED_KEYS)
    finally:
        engine.dispose()


def _migration_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == engine_module.__name__ and r.levelno >= logging.INFO]


def test_upgrade_to_head_logs_changes(empty_db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Creating or upgrading the schema logs at INFO, and a start at head logs nothing at INFO."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    shown_url = sa.make_url(empty_db_url).render_as_string(hide_password=True)
    caplog.set_level(logging.INFO, logger=engine_module.__name__)

    open_store(empty_db_url).close()
    created = _migration_messages(caplog)
    caplog.clear()
    open_store(empty_db_url).close()
    at_head = _migration_messages(caplog)
    _downgrade(empty_db_url, BEFORE_TRUSTED_KEYS)
    caplog.clear()
    open_store(empty_db_url).close()
    upgraded = _migration_messages(caplog)

    # On SQLite the file's creation is logged first.
    assert created[-1] == f"created the database schema of {shown_url} at {head}"
    assert at_head == []
    assert upgraded == [f"upgraded the database schema of {shown_url} from {BEFORE_TRUSTED_KEYS} to {head}"]


def test_set_min_runtime_version_unknown(store: Store) -> None:
    with pytest.raises(NotFoundError, match="variant 'nope' not found"):
        store.set_min_runtime_version("nope", "2.3.0")


def test_open_store_twice(db_url: str) -> None:
    first = open_store(db_url)
    _register(first)
    first.close()
    second = open_store(db_url)
    try:
        device = second.get_device("dev-1")
    finally:
        second.close()
    assert device is not None


# Devices


def test_register_new_device(store: Store) -> None:
    device = _register(store)
    assert device.device_id == "dev-1"
    assert device.instance_key_hash == KEY_A
    assert device.labels == {"site": "lab", "rack": "3"}
    assert device.agent_version == "0.1.0"
    assert device.registered_at == NOW
    assert device.last_seen == NOW
    assert device.connected is False
    assert device.profile_revisions == 1
    assert device.desired_generation == 0
    assert device.reported_generation == 0


def test_register_hardware_roundtrip(store: Store) -> None:
    _register(store)
    device = store.get_device("dev-1")
    assert device is not None
    assert device.hardware == _profile()


def test_register_update(store: Store) -> None:
    _register(store)
    later = NOW + timedelta(hours=1)
    device = _register(store, now=later, labels={"site": "field"}, agent_version="0.2.0")
    assert device.registered_at == NOW
    assert device.last_seen == later
    assert device.agent_version == "0.2.0"
    assert device.labels == {"site": "field"}


def test_register_history_on_change(store: Store) -> None:
    _register(store)
    _register(store, now=NOW + timedelta(hours=1))
    bigger = _profile(memory_total_bytes=16 << 30)
    device = _register(store, now=NOW + timedelta(hours=2), hardware=bigger)
    history = store.hardware_history("dev-1")
    assert device.profile_revisions == 2
    assert [recorded_at for recorded_at, _ in history] == [NOW, NOW + timedelta(hours=2)]
    assert [profile for _, profile in history] == [_profile(), bigger]


def test_register_history_ignores_volatile(store: Store) -> None:
    _register(store)
    fuller = _profile(memory_available_bytes=1 << 30, disk_free_bytes=1 << 30)
    device = _register(store, now=NOW + timedelta(hours=1), hardware=fuller)
    assert device.profile_revisions == 1
    assert device.hardware == fuller
    assert len(store.hardware_history("dev-1")) == 1


def test_update_disk_free(store: Store) -> None:
    _register(store)

    store.update_disk_free("dev-1", 3 << 30)

    device = store.get_device("dev-1")
    assert device is not None
    assert device.hardware.disk_free_bytes == 3 << 30
    assert device.hardware == dataclasses.replace(_profile(), disk_free_bytes=3 << 30)
    assert len(store.hardware_history("dev-1")) == 1


def test_update_disk_free_unknown(store: Store) -> None:
    with pytest.raises(NotFoundError, match="dev-missing"):
        store.update_disk_free("dev-missing", 1)


def test_hardware_history_unknown(store: Store) -> None:
    assert store.hardware_history("nope") == []


def test_register_identity_conflict(store: Store) -> None:
    original = _register(store)
    with pytest.raises(IdentityMismatchError, match="dev-1"):
        _register(
            store,
            key=KEY_B,
            now=NOW + timedelta(hours=1),
            labels={"evil": "yes"},
            agent_version="9.9.9",
            hardware=_profile(cpu_model="other"),
            peer="ipv4:10.0.0.9:1234",
        )
    conflicts = store.list_identity_conflicts()
    assert len(conflicts) == 1
    assert conflicts[0].device_id == "dev-1"
    assert conflicts[0].key_fingerprint == KEY_B[:12]
    assert conflicts[0].peer == "ipv4:10.0.0.9:1234"
    assert conflicts[0].seen_at == NOW + timedelta(hours=1)
    assert store.get_device("dev-1") == original
    assert len(store.hardware_history("dev-1")) == 1


def test_record_identity_conflict(store: Store) -> None:
    _register(store)
    conflict = IdentityConflict("dev-1", KEY_A[:12], "ipv4:10.0.0.9:1234", NOW + timedelta(minutes=5))
    store.record_identity_conflict(conflict)
    assert store.list_identity_conflicts("dev-1") == [conflict]


def test_record_identity_conflict_unknown(store: Store) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        store.record_identity_conflict(IdentityConflict("nope", KEY_A[:12], "ipv4:10.0.0.9:1234", NOW))


def test_identity_conflicts_filter(store: Store) -> None:
    _register(store, "dev-1")
    _register(store, "dev-2")
    for device_id in ("dev-1", "dev-2", "dev-2"):
        with pytest.raises(IdentityMismatchError):
            _register(store, device_id, key=KEY_B)
    assert len(store.list_identity_conflicts("dev-2")) == 2
    assert len(store.list_identity_conflicts("dev-1")) == 1
    assert len(store.list_identity_conflicts()) == 3


def test_register_race_same_key(store: Store) -> None:
    barrier = threading.Barrier(8)

    def register(index: int) -> None:
        barrier.wait()
        _register(store, "dev-raced", now=NOW + timedelta(seconds=index))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(register, range(8)))
    assert len(store.list_devices()) == 1
    assert len(store.hardware_history("dev-raced")) == 1


def test_register_race_other_keys(store: Store) -> None:
    barrier = threading.Barrier(8)

    def register(index: int) -> bool:
        barrier.wait()
        try:
            _register(store, "dev-raced", key=f"{index:02d}" * 32)
        except IdentityMismatchError:
            return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(register, range(8)))
    assert results.count(True) == 1
    assert len(store.list_identity_conflicts("dev-raced")) == 7


def test_register_invalid_stores_nothing(store: Store) -> None:
    with pytest.raises(ValueError, match="time zone"):
        _register(store, now=datetime(2026, 3, 1, 12, 0))
    with pytest.raises(StoreError, match="device_id"):
        _register(store, device_id="")
    assert store.list_devices() == []


def test_device_unknown(store: Store) -> None:
    assert store.get_device("nope") is None


def test_list_devices(store: Store) -> None:
    _register(store, "dev-b", labels={"zone": "b"})
    _register(store, "dev-a", labels={})
    devices = store.list_devices()
    assert [device.device_id for device in devices] == ["dev-a", "dev-b"]
    assert [device.labels for device in devices] == [{}, {"zone": "b"}]
    assert [device.profile_revisions for device in devices] == [1, 1]


def test_timestamps_returned_utc(store: Store) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    local = datetime(2026, 3, 1, 17, 30, 0, 123456, tzinfo=india)
    device = _register(store, now=local)
    assert device.registered_at.utcoffset() == timedelta(0)
    assert device.registered_at == local


def test_touch_devices(store: Store) -> None:
    _register(store, "dev-1")
    _register(store, "dev-2")
    later = NOW + timedelta(minutes=5)
    unknown = store.touch_devices({"dev-1": later, "dev-2": later, "ghost": later})
    assert [device.last_seen for device in store.list_devices()] == [later, later]
    assert store.get_device("ghost") is None
    assert unknown == {"ghost"}


def test_touch_devices_never_backwards(store: Store) -> None:
    _register(store)
    store.touch_devices({"dev-1": NOW - timedelta(minutes=5)})
    device = store.get_device("dev-1")
    assert device is not None
    assert device.last_seen == NOW


def test_touch_devices_empty(store: Store) -> None:
    assert store.touch_devices({}) == frozenset()
    assert store.list_devices() == []


def test_set_connected(store: Store) -> None:
    _register(store)
    later = NOW + timedelta(seconds=30)
    store.set_connected("dev-1", True, later)
    connected = store.get_device("dev-1")
    store.set_connected("dev-1", False, NOW)
    disconnected = store.get_device("dev-1")
    assert connected is not None
    assert disconnected is not None
    assert connected.connected is True
    assert connected.last_seen == later
    assert disconnected.connected is False
    assert disconnected.last_seen == later


def test_set_connected_unknown(store: Store) -> None:
    with pytest.raises(NotFoundError, match="ghost"):
        store.set_connected("ghost", True, NOW)


# Models and variants


def test_add_model_version(store: Store) -> None:
    stored = store.add_model_version(_model(), _variant())
    assert stored == _model()
    assert store.get_model_version("effnet", "1") == _model()
    assert store.get_variant("effnet-1-source") == _variant(created_at=NOW)


def test_add_model_version_idempotent(store: Store) -> None:
    store.add_model_version(_model(), _variant())
    again = store.add_model_version(_model(created_at=NOW + timedelta(days=1)), _variant())
    assert again == _model()
    assert len(store.list_model_versions()) == 1
    assert len(store.list_variants("effnet")) == 1


def test_add_model_version_other_digest(store: Store) -> None:
    store.add_model_version(_model(), _variant())
    with pytest.raises(AlreadyExistsError, match="effnet:1"):
        store.add_model_version(_model(digest="sha256:" + "2" * 64), _variant("other", digest="sha256:" + "2" * 64))
    assert store.get_model_version("effnet", "1").digest == "sha256:" + "1" * 64
    assert [variant.variant_id for variant in store.list_variants("effnet")] == ["effnet-1-source"]


def test_add_model_version_variant_mismatch(store: Store) -> None:
    with pytest.raises(StoreError, match="effnet:2"):
        store.add_model_version(_model(), _variant(version="2"))
    assert store.list_model_versions() == []


def test_add_model_version_duplicate_variant(store: Store) -> None:
    store.add_model_version(_model(), _variant("shared"))
    with pytest.raises(AlreadyExistsError, match="shared"):
        store.add_model_version(_model("2", digest="sha256:" + "2" * 64), _variant("shared", version="2"))
    assert [model.version for model in store.list_model_versions()] == ["1"]


def test_model_version_latest_by_creation(store: Store) -> None:
    store.add_model_version(_model("2", created_at=NOW), _variant("v2", version="2"))
    store.add_model_version(_model("1.5", created_at=NOW + timedelta(hours=1)), _variant("v15", version="1.5"))
    assert store.get_model_version("effnet").version == "1.5"


def test_model_version_latest_same_time(store: Store) -> None:
    store.add_model_version(_model("a"), _variant("va", version="a"))
    store.add_model_version(_model("b"), _variant("vb", version="b"))
    assert store.get_model_version("effnet").version == "b"


@pytest.mark.parametrize(("name", "version"), [("ghost", None), ("ghost", "1"), ("effnet", "9")])
def test_model_version_unknown(store: Store, name: str, version: str | None) -> None:
    store.add_model_version(_model(), _variant())
    with pytest.raises(NotFoundError, match=name):
        store.get_model_version(name, version)


def test_list_model_versions(store: Store) -> None:
    store.add_model_version(_model("1"), _variant("e1"))
    store.add_model_version(_model("2", created_at=NOW + timedelta(hours=1)), _variant("e2", version="2"))
    other = dataclasses.replace(_model(), name="mobilenet")
    store.add_model_version(other, _variant("m1", model_name="mobilenet"))
    assert [(m.name, m.version) for m in store.list_model_versions()] == [
        ("effnet", "1"),
        ("effnet", "2"),
        ("mobilenet", "1"),
    ]
    assert [m.name for m in store.list_model_versions("mobilenet")] == ["mobilenet"]


def test_add_variant(store: Store) -> None:
    store.add_model_version(_model(), _variant())
    int8 = _variant(
        "effnet-1-int8",
        kind="int8",
        precision="int8",
        digest="sha256:" + "3" * 64,
        size_bytes=5_000_000,
        metadata=_metadata("int8"),
        status="rejected",
        rejection_reason="top-1 dropped 4.1 points",
        accuracy=0.712,
        accuracy_metric="top1",
        latency_ms={"threads=1": 41.5, "threads=4": 12.0},
        parent_variant_id="effnet-1-source",
        created_at=NOW + timedelta(minutes=3),
    )
    assert store.add_variant(int8) == int8
    assert store.get_variant("effnet-1-int8") == int8


def test_add_variant_default_created_at(store: Store) -> None:
    store.add_model_version(_model(), _variant())
    before = datetime.now(UTC)
    stored = store.add_variant(_variant("effnet-1-pruned", kind="pruned"))
    assert stored.created_at is not None
    assert stored.created_at >= before - timedelta(seconds=1)
    assert stored.created_at.utcoffset() == timedelta(0)


def test_add_variant_unknown_model(store: Store) -> None:
    with pytest.raises(NotFoundError, match="effnet:1"):
        store.add_variant(_variant())


def test_add_variant_duplicate(store: Store) -> None:
    store.add_model_version(_model(), _variant())
    with pytest.raises(AlreadyExistsError, match="effnet-1-source"):
        store.add_variant(_variant(kind="int8"))
    assert store.get_variant("effnet-1-source").kind == "source"


def test_get_variant_unknown(store: Store) -> None:
    with pytest.raises(NotFoundError, match="ghost"):
        store.get_variant("ghost")


def test_list_variants(store: Store) -> None:
    store.add_model_version(_model("1"), _variant("e1"))
    store.add_model_version(_model("2", created_at=NOW + timedelta(hours=1)), _variant("e2", version="2"))
    store.add_variant(_variant("e1-int8", kind="int8", created_at=NOW + timedelta(hours=2)))
    assert [v.variant_id for v in store.list_variants("effnet")] == ["e1", "e2", "e1-int8"]
    assert [v.variant_id for v in store.list_variants("effnet", "1")] == ["e1", "e1-int8"]
    assert store.list_variants("ghost") == []


# Desired and reported state


@pytest.fixture
def fleet(store: Store) -> Store:
    """The store with device dev-1 and model effnet:1 with variants effnet-1-source and effnet-1-int8."""
    _register(store)
    store.add_model_version(_model(), _variant())
    store.add_variant(_variant("effnet-1-int8", kind="int8", digest="sha256:" + "3" * 64))
    mobilenet = dataclasses.replace(_model(), name="mobilenet")
    store.add_model_version(mobilenet, _variant("mobilenet-1-source", model_name="mobilenet"))
    return store


def test_set_assignment_generation(fleet: Store) -> None:
    first = fleet.set_assignment(_assignment(fleet.get_variant("mobilenet-1-source")))
    second = fleet.set_assignment(_assignment(fleet.get_variant("effnet-1-source")))
    generation, assigned = fleet.get_desired_state("dev-1")
    assert (first, second) == (1, 2)
    assert generation == 2
    assert [a.model_name for a in assigned] == ["effnet", "mobilenet"]
    assert assigned[0] == _assignment(fleet.get_variant("effnet-1-source"))


def test_set_assignment_replaces(fleet: Store) -> None:
    fleet.set_assignment(_assignment(fleet.get_variant("effnet-1-source")))
    int8 = _assignment(fleet.get_variant("effnet-1-int8"), threads=0, rollout_id="rollout-2")
    generation = fleet.set_assignment(int8)
    assert generation == 2
    assert fleet.get_desired_state("dev-1") == (2, [int8])


def test_set_assignment_unknown_device(fleet: Store) -> None:
    with pytest.raises(NotFoundError, match="ghost"):
        fleet.set_assignment(_assignment(fleet.get_variant("effnet-1-source"), device_id="ghost"))


def test_set_assignment_unknown_variant(fleet: Store) -> None:
    with pytest.raises(NotFoundError, match="ghost-variant"):
        fleet.set_assignment(_assignment(fleet.get_variant("effnet-1-source"), variant_id="ghost-variant"))
    assert fleet.get_desired_state("dev-1") == (0, [])


def test_set_assignment_mismatch(fleet: Store) -> None:
    wrong = _assignment(fleet.get_variant("effnet-1-source"), digest="sha256:" + "9" * 64)
    with pytest.raises(StoreError, match="effnet-1-source"):
        fleet.set_assignment(wrong)
    assert fleet.get_desired_state("dev-1") == (0, [])


def test_remove_assignment(fleet: Store) -> None:
    fleet.set_assignment(_assignment(fleet.get_variant("effnet-1-source")))
    fleet.set_assignment(_assignment(fleet.get_variant("mobilenet-1-source")))
    generation = fleet.remove_assignment("dev-1", "effnet")
    assert generation == 3
    assert [a.model_name for a in fleet.get_desired_state("dev-1")[1]] == ["mobilenet"]


def test_remove_assignment_unassigned(fleet: Store) -> None:
    assert fleet.remove_assignment("dev-1", "effnet") == 1
    assert fleet.get_desired_state("dev-1") == (1, [])


def test_remove_assignment_unknown_device(fleet: Store) -> None:
    with pytest.raises(NotFoundError, match="ghost"):
        fleet.remove_assignment("ghost", "effnet")


def test_desired_state_unknown(store: Store) -> None:
    with pytest.raises(NotFoundError, match="ghost"):
        store.get_desired_state("ghost")


def test_readmitted_device_continues_generations(fleet: Store) -> None:
    """A removed id registered again starts above its last generation, so its agent accepts new counters."""
    fleet.set_assignment(_assignment(fleet.get_variant("effnet-1-source")))
    fleet.set_assignment(_assignment(fleet.get_variant("mobilenet-1-source")))
    fleet.remove_device("dev-1", NOW)
    removed = fleet.get_removed_device("dev-1")
    assert removed is not None

    _register(fleet, key=KEY_B, now=NOW + timedelta(seconds=1), readmitted_removal=removed.removed_at)
    generation_after = fleet.get_desired_state("dev-1")
    next_generation = fleet.set_assignment(_assignment(fleet.get_variant("effnet-1-source")))

    assert removed is not None
    assert removed.desired_generation == 2
    assert generation_after == (3, [])
    assert next_generation == 4
    assert fleet.get_removed_device("dev-1") is None


def test_register_removed_not_readmitted(fleet: Store) -> None:
    """A registration whose caller readmitted no removal, or an older one, leaves a removed id removed."""
    fleet.remove_device("dev-1", NOW)

    for readmitted in (None, NOW - timedelta(hours=1)):
        with pytest.raises(DeviceRemovedError) as raised:
            _register(fleet, key=KEY_B, now=NOW + timedelta(seconds=1), readmitted_removal=readmitted)
        assert raised.value.removed.removed_at == NOW
        assert fleet.get_device("dev-1") is None
        assert fleet.get_removed_device("dev-1") is not None


def test_desired_generation_on_device(fleet: Store) -> None:
    fleet.set_assignment(_assignment(fleet.get_variant("effnet-1-source")))
    device = fleet.get_device("dev-1")
    assert device is not None
    assert device.desired_generation == 1


def test_save_reported_state(store: Store) -> None:
    _register(store)
    stamped = _status("mobilenet", "failed", error="out of memory", updated_at=NOW - timedelta(seconds=5))
    store.save_reported_state("dev-1", 3, [_status(), stamped], NOW)
    statuses = store.get_reported_state("dev-1")
    device = store.get_device("dev-1")
    assert statuses == [_status(updated_at=NOW), stamped]
    assert device is not None
    assert device.reported_generation == 3


def test_save_reported_state_replaces(store: Store) -> None:
    _register(store)
    store.save_reported_state("dev-1", 3, [_status(), _status("mobilenet")], NOW)
    store.save_reported_state("dev-1", 4, [_status(state="loading")], NOW + timedelta(seconds=1))
    statuses = store.get_reported_state("dev-1")
    assert [(s.model_name, s.state) for s in statuses] == [("effnet", "loading")]


def test_save_reported_state_empty(store: Store) -> None:
    _register(store)
    store.save_reported_state("dev-1", 1, [_status()], NOW)
    store.save_reported_state("dev-1", 2, [], NOW)
    assert store.get_reported_state("dev-1") == []


def test_save_reported_state_unknown(store: Store) -> None:
    with pytest.raises(NotFoundError, match="ghost"):
        store.save_reported_state("ghost", 1, [], NOW)


@pytest.mark.parametrize("status", [_status(state="exploded"), _status(device_id="dev-2")], ids=["state", "device"])
def test_save_reported_state_invalid(store: Store, status: ModelStatus) -> None:
    _register(store)
    store.save_reported_state("dev-1", 1, [_status()], NOW)
    with pytest.raises(StoreError):
        store.save_reported_state("dev-1", 2, [status], NOW)
    device = store.get_device("dev-1")
    assert device is not None
    assert device.reported_generation == 1
    assert len(store.get_reported_state("dev-1")) == 1


def test_reported_state_unknown(store: Store) -> None:
    assert store.get_reported_state("ghost") == []


def test_trusted_keys_stored(store: Store) -> None:
    _register(store)
    before = store.get_device("dev-1")
    store.save_reported_state("dev-1", 1, [], NOW, trusted_keys=(3, ["bbbb000000000000", "aaaa000000000000"]))
    device = store.get_device("dev-1")
    assert before is not None
    assert before.trusted_key_set_version is None
    assert before.trusted_key_ids == ()
    assert device is not None
    assert device.trusted_key_set_version == 3
    assert device.trusted_key_ids == ("aaaa000000000000", "bbbb000000000000")
    assert [d.trusted_key_ids for d in store.list_devices()] == [device.trusted_key_ids]


def test_trusted_keys_kept_without_report(store: Store) -> None:
    """A report without keys (an agent that trusts none yet) leaves the stored keys as they were."""
    _register(store)
    store.save_reported_state("dev-1", 1, [], NOW, trusted_keys=(2, ["aaaa000000000000"]))
    store.save_reported_state("dev-1", 2, [], NOW)
    device = store.get_device("dev-1")
    assert device is not None
    assert device.reported_generation == 2
    assert device.trusted_key_set_version == 2
    assert device.trusted_key_ids == ("aaaa000000000000",)


# Metrics


def test_add_metric_batch(store: Store) -> None:
    _register(store)
    windows = [_window(minute=0), _window(minute=1, inference_count=7, sketch=b"")]
    assert store.add_metric_batch("dev-1", "batch-1", windows) is True
    assert store.query_metric_windows() == windows


def test_removed_device_ids_with_windows(store: Store) -> None:
    for device_id in ("dev-1", "dev-2", "dev-3"):
        _register(store, device_id)
    store.add_metric_batch("dev-1", "batch-1", [_window("dev-1")])
    store.add_metric_batch("dev-3", "batch-3", [_window("dev-3")])
    store.remove_device("dev-3", NOW)
    store.remove_device("dev-2", NOW)

    assert store.removed_device_ids_with_windows() == ["dev-3"]


def test_add_metric_batch_duplicate(store: Store) -> None:
    _register(store)
    store.add_metric_batch("dev-1", "batch-1", [_window(minute=0)])
    assert store.add_metric_batch("dev-1", "batch-1", [_window(minute=5)]) is False
    assert [w.window_start for w in store.query_metric_windows()] == [NOW]


def test_add_metric_batch_same_id_other_device(store: Store) -> None:
    _register(store, "dev-1")
    _register(store, "dev-2")
    store.add_metric_batch("dev-1", "batch-1", [_window("dev-1")])
    assert store.add_metric_batch("dev-2", "batch-1", [_window("dev-2")]) is True


def test_add_metric_batch_race(store: Store) -> None:
    _register(store)
    barrier = threading.Barrier(8)

    def add(index: int) -> bool:
        barrier.wait()
        return store.add_metric_batch("dev-1", "raced", [_window(minute=index)])

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(add, range(8)))
    assert results.count(True) == 1
    assert len(store.query_metric_windows()) == 1


def test_add_metric_batch_unknown_device(store: Store) -> None:
    with pytest.raises(NotFoundError, match="ghost"):
        store.add_metric_batch("ghost", "batch-1", [_window("ghost")])


@pytest.mark.parametrize(
    ("batch_id", "window"), [("", _window()), ("batch-1", _window("dev-2"))], ids=["empty-id", "other-device"]
)
def test_add_metric_batch_invalid(store: Store, batch_id: str, window: MetricWindow) -> None:
    _register(store)
    with pytest.raises(StoreError):
        store.add_metric_batch("dev-1", batch_id, [window])
    assert store.query_metric_windows() == []


def test_add_metric_batch_naive_window(store: Store) -> None:
    _register(store)
    naive = _window(window_start=datetime(2026, 3, 1, 12, 0))
    with pytest.raises(ValueError, match="window_start"):
        store.add_metric_batch("dev-1", "batch-1", [_window(minute=1), naive])
    assert store.add_metric_batch("dev-1", "batch-1", [_window()]) is True


_QUERY_CASES: list[tuple[dict[str, Any], list[str]]] = [
    ({}, ["a0", "a1", "b0", "c0"]),
    ({"device_id": "dev-2"}, ["b0"]),
    ({"model_name": "mobilenet"}, ["c0"]),
    ({"variant_id": "effnet-1-int8"}, ["a1"]),
    ({"hardware_class": "x86"}, ["b0"]),
    ({"device_id": "dev-1", "model_name": "effnet"}, ["a0", "a1"]),
    ({"device_id": "dev-1", "hardware_class": "x86"}, []),
]


@pytest.mark.parametrize(("filters", "expected"), _QUERY_CASES)
def test_query_metric_filters(store: Store, filters: dict[str, Any], expected: list[str]) -> None:
    _register(store, "dev-1")
    _register(store, "dev-2")
    tagged = {
        "a0": _window("dev-1", minute=0),
        "a1": _window("dev-1", minute=1, variant_id="effnet-1-int8"),
        "b0": _window("dev-2", minute=2, hardware_class="x86"),
        "c0": _window("dev-1", minute=3, model_name="mobilenet", variant_id="mobilenet-1-source"),
    }
    store.add_metric_batch("dev-1", "b1", [tagged["a0"], tagged["a1"], tagged["c0"]])
    store.add_metric_batch("dev-2", "b2", [tagged["b0"]])
    by_window = {window: tag for tag, window in tagged.items()}
    assert [by_window[w] for w in store.query_metric_windows(**filters)] == expected
    assert [by_window[w] for w in store.iter_metric_windows(**filters)] == expected


def test_iter_metric_windows_batches(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows read in several batches come back complete and in window_start order."""
    monkeypatch.setattr(sql, "METRIC_WINDOW_BATCH_ROWS", 3)
    _register(store)
    windows = [_window(minute=m) for m in range(10)]
    store.add_metric_batch("dev-1", "b1", windows[::-1])

    assert list(store.iter_metric_windows()) == windows
    assert list(store.iter_metric_windows(start=windows[4].window_start)) == windows[4:]


def test_query_metric_time_range(store: Store) -> None:
    _register(store)
    store.add_metric_batch("dev-1", "b1", [_window(minute=m) for m in range(5)])
    india = timezone(timedelta(hours=5, minutes=30))
    start = (NOW + timedelta(minutes=1)).astimezone(india)
    end = NOW + timedelta(minutes=3)
    selected = store.query_metric_windows(start=start, end=end)
    assert [w.window_start for w in selected] == [NOW + timedelta(minutes=1), NOW + timedelta(minutes=2)]
    assert len(store.query_metric_windows(start=end)) == 2
    assert len(store.query_metric_windows(end=start)) == 1


# (filters, expected tags) for test_query_metric_by_receipt. Every query starts at NOW. With an
# end, the receive times it matches end an hour after that end.
_RECEIPT_CASES: list[tuple[dict[str, Any], list[str]]] = [
    ({"end": NOW + timedelta(minutes=10), "received_device_ids": {"dev-2"}}, ["skewed", "recent", "future"]),
    ({"end": NOW + timedelta(minutes=10)}, ["recent", "future"]),
    ({"received_device_ids": {"dev-2"}}, ["skewed", "recent", "future"]),
    ({}, ["recent", "future"]),
]


@pytest.mark.parametrize(("filters", "expected"), _RECEIPT_CASES, ids=["skewed-end", "end", "skewed", "open"])
def test_query_metric_by_receipt(store: Store, filters: dict[str, Any], expected: list[str]) -> None:
    """Windows that were only delivered late do not match by their receive time."""
    _register(store, "dev-1")
    _register(store, "dev-2")
    received_at = NOW + timedelta(minutes=1)
    tagged = {
        "late": _window("dev-1", received_at=received_at, window_start=NOW - timedelta(days=2)),
        "skewed": _window("dev-2", received_at=received_at, window_start=NOW - timedelta(hours=1)),
        "recent": _window("dev-1", received_at=received_at, window_start=NOW),
        "future": _window("dev-1", received_at=received_at, window_start=NOW + timedelta(hours=2)),
    }
    store.add_metric_batch("dev-1", "b1", [tagged["late"], tagged["recent"], tagged["future"]])
    store.add_metric_batch("dev-2", "b2", [tagged["skewed"]])
    by_window = {window: tag for tag, window in tagged.items()}
    received_end = filters["end"] + timedelta(hours=1) if "end" in filters else None

    selected = store.query_metric_windows(start=NOW, received_start=NOW, received_end=received_end, **filters)

    assert [by_window[w] for w in selected] == expected


# Concurrency


def _run_threads(count: int, work: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            barrier.wait()
            work(index)
        except BaseException as error:  # Collected and asserted on below.
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return errors


def test_sqlite_concurrent_writers(tmp_path: Path) -> None:
    """8 threads each run 50 rounds of a registration, a touch and a metric batch on one SQLite file.

    The threads share two stores, like two orchestrator processes, so writers of different stores
    contend through SQLite's own locking.
    """
    threads, rounds = 8, 50
    url = f"sqlite:///{tmp_path / 'edgefleet.db'}"
    stores = [open_store(url), open_store(url)]

    def work(thread: int) -> None:
        store = stores[thread % len(stores)]
        for round_index in range(rounds):
            device_id = f"dev-{thread}-{round_index}"
            seen = NOW + timedelta(seconds=round_index)
            _register(store, device_id, now=NOW)
            store.touch_devices({f"dev-{thread}-{r}": seen for r in range(round_index + 1)})
            store.add_metric_batch(device_id, f"batch-{round_index}", [_window(device_id, minute=thread)])

    try:
        errors = _run_threads(threads, work)
        devices = stores[0].list_devices()
        windows = stores[0].query_metric_windows()
    finally:
        for store in stores:
            store.close()
    assert errors == []
    assert len(devices) == threads * rounds
    assert len(windows) == threads * rounds
    # The last round touches every device of its thread.
    assert {device.last_seen for device in devices} == {NOW + timedelta(seconds=rounds - 1)}
