"""The Python client of the healthcode service: channels (TLS, tokens) and a typed call per RPC."""

from healthcode.client.client import DEFAULT_MESSAGE_BYTES, Client, channel_credentials, make_channel, read_token

__all__ = ["DEFAULT_MESSAGE_BYTES", "Client", "channel_credentials", "make_channel", "read_token"]
