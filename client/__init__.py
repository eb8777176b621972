"""Clients of the streaming server: a webcam/virtual-camera filter and a load tester.

Both talk to the server through `client.connection` (the only protocol-facing code) and share the pure
message helpers in `client.protocol`.
"""
