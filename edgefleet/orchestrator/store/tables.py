"""SQLAlchemy Core tables of the SQL store; the Alembic revisions under migrations/ create them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

# Constraint names follow one pattern, so migrations can refer to them on every backend.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp that accepts only timezone-aware datetimes and returns them in UTC.

    SQLite keeps no offset, so values are converted to UTC before they are written and marked as UTC
    when read. PostgreSQL returns timestamptz in the session time zone, which is converted back to UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} cannot be stored; pass a timezone-aware value "
                "such as datetime.now(UTC)"
            )
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {value!r}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _device_fk() -> sa.ForeignKey:
    return sa.ForeignKey("devices.device_id", ondelete="CASCADE")


devices = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.String, primary_key=True),
    sa.Column("instance_key_hash", sa.String, nullable=False),
    sa.Column("hardware", sa.JSON, nullable=False),
    sa.Column("hardware_class", sa.String, nullable=False),
    sa.Column("agent_version", sa.String, nullable=False),
    sa.Column("registered_at", UtcDateTime, nullable=False),
    sa.Column("last_seen", UtcDateTime, nullable=True),
    sa.Column("connected", sa.Boolean, nullable=False),
    sa.Column("desired_generation", sa.BigInteger, nullable=False),
    sa.Column("reported_generation", sa.BigInteger, nullable=False),
    # The signing key set the agent last reported trusting: NULL until it reports one, and the key
    # ids as a JSON list.
    sa.Column("trusted_key_set_version", sa.BigInteger, nullable=True),
    sa.Column("trusted_key_ids", sa.JSON, nullable=True),
    # Rollouts and variant choice select the devices of one hardware class.
    sa.Index(None, "hardware_class"),
)

device_labels = sa.Table(
    "device_labels",
    metadata,
    sa.Column("device_id", sa.String, _device_fk(), primary_key=True),
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.String, nullable=False),
    # Label selectors look devices up by key and value; the primary key serves lookups by device.
    sa.Index(None, "key", "value"),
)

# One row per distinct hardware profile of a device, appended when the profile changes.
hardware_profiles = sa.Table(
    "hardware_profiles",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String, _device_fk(), nullable=False),
    sa.Column("recorded_at", UtcDateTime, nullable=False),
    sa.Column("profile", sa.JSON, nullable=False),
    # The history of one device is read in insertion order and counted per device.
    sa.Index(None, "device_id", "id"),
)

identity_conflicts = sa.Table(
    "identity_conflicts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String, _device_fk(), nullable=False),
    sa.Column("key_fingerprint", sa.String, nullable=False),
    sa.Column("peer", sa.String, nullable=False),
    sa.Column("seen_at", UtcDateTime, nullable=False),
    # Operators list the conflicts of one device.
    sa.Index(None, "device_id", "seen_at"),
)

model_versions = sa.Table(
    "model_versions",
    metadata,
    # A surrogate key orders versions created within the same timestamp by insertion.
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("version", sa.String, nullable=False),
    sa.Column("digest", sa.String, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("name", "version"),
    # The newest version of a model is found by creation time.
    sa.Index(None, "name", "created_at"),
)

variants = sa.Table(
    "variants",
    metadata,
    sa.Column("variant_id", sa.String, primary_key=True),
    sa.Column("model_name", sa.String, nullable=False),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("format", sa.String, nullable=False),
    sa.Column("precision", sa.String, nullable=False),
    sa.Column("digest", sa.String, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("rejection_reason", sa.String, nullable=False),
    sa.Column("accuracy", sa.Float, nullable=True),
    sa.Column("accuracy_metric", sa.String, nullable=False),
    sa.Column("accuracy_drop", sa.Float, nullable=True),
    # NULL for variants gated before the count was kept.
    sa.Column("evaluation_samples", sa.Integer, nullable=True),
    # NULL for variants gated before the digest was kept.
    sa.Column("evaluation_digest", sa.String, nullable=True),
    sa.Column("latency_ms", sa.JSON, nullable=False),
    # NULL for variants gated before the source's figure was kept.
    sa.Column("source_latency_ms", sa.JSON, nullable=True),
    # Not a foreign key: "" means no parent, as in the domain record.
    sa.Column("parent_variant_id", sa.String, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.ForeignKeyConstraint(["model_name", "model_version"], ["model_versions.name", "model_versions.version"]),
    # Variants are listed per model version; the index also serves the foreign key.
    sa.Index(None, "model_name", "model_version", "created_at"),
)

assignments = sa.Table(
    "assignments",
    metadata,
    # One assignment per device and model name: a device runs one variant of each model.
    sa.Column("device_id", sa.String, _device_fk(), primary_key=True),
    sa.Column("model_name", sa.String, primary_key=True),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("variant_id", sa.String, sa.ForeignKey("variants.variant_id"), nullable=False),
    sa.Column("digest", sa.String, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("format", sa.String, nullable=False),
    sa.Column("threads", sa.Integer, nullable=False),
    sa.Column("rollout_id", sa.String, nullable=False),
    # Rollouts find the devices that run a variant; PostgreSQL does not index foreign keys itself.
    sa.Index(None, "variant_id"),
)

model_statuses = sa.Table(
    "model_statuses",
    metadata,
    # A device may report two entries for one model while it swaps versions, so rows get a
    # surrogate key. The key also keeps the order of the report.
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String, _device_fk(), nullable=False),
    sa.Column("model_name", sa.String, nullable=False),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("variant_id", sa.String, nullable=False),
    sa.Column("digest", sa.String, nullable=False),
    sa.Column("state", sa.String, nullable=False),
    sa.Column("error", sa.String, nullable=False),
    sa.Column("runtime", sa.String, nullable=False),
    sa.Column("providers", sa.JSON, nullable=False),
    sa.Column("threads", sa.Integer, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    # Each report replaces the rows of one device.
    sa.Index(None, "device_id", "id"),
)

# The metric tables hold device ids without a foreign key, so the windows of a removed device stay
# queryable by its id.
metric_batches = sa.Table(
    "metric_batches",
    metadata,
    sa.Column("device_id", sa.String, primary_key=True),
    # The primary key makes a resent batch a no-op, also when two copies arrive at once.
    sa.Column("batch_id", sa.String, primary_key=True),
    sa.Column("received_at", UtcDateTime, nullable=False),
)

metric_windows = sa.Table(
    "metric_windows",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String, nullable=False),
    sa.Column("batch_id", sa.String, nullable=False),
    sa.Column("model_name", sa.String, nullable=False),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("variant_id", sa.String, nullable=False),
    sa.Column("hardware_class", sa.String, nullable=False),
    sa.Column("window_start", UtcDateTime, nullable=False),
    sa.Column("window_seconds", sa.Integer, nullable=False),
    sa.Column("received_at", UtcDateTime, nullable=False),
    sa.Column("inference_count", sa.BigInteger, nullable=False),
    sa.Column("error_count", sa.BigInteger, nullable=False),
    sa.Column("sketch", sa.LargeBinary, nullable=False),
    # query_metric_windows filters by these columns and a window_start range. Each index serves
    # one filter together with the range, and the last one serves a range alone.
    sa.Index(None, "device_id", "window_start"),
    sa.Index(None, "model_name", "window_start"),
    sa.Index(None, "variant_id", "window_start"),
    sa.Index(None, "hardware_class", "window_start"),
    sa.Index(None, "window_start"),
    # Retention selects windows by receive time, and so do queries for devices with skewed clocks.
    sa.Index(None, "received_at"),
)

# Devices an operator removed, so that an agent with a removed device's credentials cannot rejoin the
# fleet. With TLS a new enrollment token readmits the id. Without TLS an agent with another instance key may take it.
removed_devices = sa.Table(
    "removed_devices",
    metadata,
    sa.Column("device_id", sa.String, primary_key=True),
    sa.Column("instance_key_hash", sa.String, nullable=False),
    sa.Column("removed_at", UtcDateTime, nullable=False),
    # The device's desired generation when it was removed. A readmitted id continues above it, because
    # its agent rejects signed assignments whose counter is below one it has run.
    sa.Column("desired_generation", sa.BigInteger, nullable=False, server_default="0"),
)
