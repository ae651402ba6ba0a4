"""The wire formats to and from Arrow columns, shared by the service and the client: :mod:`~healthcode.wire.ipc`
(Arrow IPC bytes; no kernel, what the client uses), :mod:`~healthcode.wire.rows` (the protobuf row form through the
kernel's codec) and :mod:`~healthcode.wire.ingest` (the ingest requests as Arrow tables)."""
