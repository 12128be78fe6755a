"""Live updates: websockets (consumers, their handshake and origin checks), the pushes every
open page receives (live.py) and the one module that touches the channel layer's private
parts (layers.py)."""
