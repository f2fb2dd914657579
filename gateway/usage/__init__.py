"""The usage ledger: one record per admitted request, from the quota store to
day-partitioned Parquet files, priced for finance (see docs/ledger.md).

    record.py    the record, its draft on the request path, and the encoded entry
    ledger.py    the Parquet ledger on disk: durable writes, compaction, retention
    sources.py   where records wait before the ledger: Redis Streams or a buffer
    drainer.py   the background task that moves records into the ledger
    pricing.py   prices in force per model and day; cost of token counts (pure)
    export.py    DuckDB queries over the ledger: grouped, de-duplicated, priced
"""
