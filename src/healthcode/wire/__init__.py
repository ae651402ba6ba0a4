"""The wire formats: protobuf row form and Arrow IPC bytes to and from Arrow columns, shared by the service and
the client."""
