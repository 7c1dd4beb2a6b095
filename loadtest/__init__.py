"""HTTP load generator for SegQuant Serve: closed- or open-loop traffic over a mix of variants.

It speaks only the service's public HTTP API (``POST /generate``) and needs nothing from the service's
Python packages, so it can run from any machine that can reach the server.
"""
