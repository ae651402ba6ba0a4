"""The gRPC service: start-up and shutdown, the RPCs (thin glue over the rules and the live state), the per-call
guard (authentication, limits, overload), the one interceptor that turns exceptions into status codes, the
shedding front, transport settings, configuration and metrics.
"""
